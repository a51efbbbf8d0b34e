"""Bad settings and inputs, each through the real command line: one clear line on stderr that
names the problem and the fix, the documented exit status, and nothing lost."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from conftest import free_address, run_cli

# A case's setup arranges what the command will meet (files, a busy port, claimed shards) inside
# tmp_path; whatever must stay open while the command runs goes on the ExitStack, which the
# `held` fixture closes afterwards. It returns settings to add to the command's environment.
Setup = Callable[[Path, ExitStack], dict[str, str]]


@dataclass
class Case:
    name: str
    args: list[str]
    env: dict[str, str]
    code: int
    message: str
    setup: Setup = field(default=lambda _tmp, _held: {})


def corrupt(relative: str, content: bytes = b"garbage") -> Setup:
    def setup(tmp: Path, _held: ExitStack) -> dict[str, str]:
        (tmp / "data" / relative).write_bytes(content)
        return {}

    return setup


def remove(relative: str) -> Setup:
    def setup(tmp: Path, _held: ExitStack) -> dict[str, str]:
        (tmp / "data" / relative).unlink()
        return {}

    return setup


def make(path: str, file: bool = False) -> Setup:
    def setup(tmp: Path, _held: ExitStack) -> dict[str, str]:
        (tmp / path).write_text("x") if file else (tmp / path).mkdir()
        return {}

    return setup


def occupied_port(tmp: Path, held: ExitStack) -> dict[str, str]:
    """A port that a listening socket holds while the server tries to bind it."""
    sock = held.enter_context(socket.socket())
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return {"SERVER_LISTEN_ADDRESS": f"127.0.0.1:{sock.getsockname()[1]}"}


def occupied_metrics_port(tmp: Path, held: ExitStack) -> dict[str, str]:
    """The metrics port held by a listening socket; the gRPC port is free."""
    busy = occupied_port(tmp, held)["SERVER_LISTEN_ADDRESS"]
    return {"METRICS_PORT": busy.rsplit(":", 1)[1], "SERVER_LISTEN_ADDRESS": free_address()}


def ca_with_passphrase(passphrase: str) -> Setup:
    def setup(tmp: Path, _held: ExitStack) -> dict[str, str]:
        from flowerpot.certs import open_ca

        open_ca(tmp / "certs", passphrase)
        return {}

    return setup


def address_of_nothing(tmp: Path, held: ExitStack) -> dict[str, str]:
    return {"SERVER_ADDRESS": free_address()}


def listen_somewhere_free(tmp: Path, held: ExitStack) -> dict[str, str]:
    return {"SERVER_LISTEN_ADDRESS": free_address()}


def all_shards_claimed(tmp: Path, held: ExitStack) -> dict[str, str]:
    """Another process's claims: held by this test process until the command has run."""
    from client.claim import claim_shard

    for _ in range(3):
        held.enter_context(claim_shard(tmp / "data"))
    return {}


ONE_SHARD = {"NUM_SHARDS": "1", "MIN_AVAILABLE_CLIENTS": "1", "MIN_FIT_CLIENTS": "1", "MIN_EVALUATE_CLIENTS": "1"}
CLIENT = {"CONNECT_TIMEOUT": "2"}


def doing(*steps: Callable[[Path], object], free: bool = False) -> Setup:
    """A setup made of steps on tmp_path; with `free`, the server also listens on a free port."""

    def setup(tmp: Path, _held: ExitStack) -> dict[str, str]:
        for step in steps:
            step(tmp)
        return {"SERVER_LISTEN_ADDRESS": free_address()} if free else {}

    return setup


def write_model(tmp: Path, fill: float | None = None) -> None:
    """m.npz: the digits model of the shards in tmp/data, optionally every value set to `fill`."""
    from client.data.shards import load_shard
    from client.tasks import get_weights, load_task
    from shared.modelfile import save_model

    arrays = get_weights(load_task().new_model(load_shard(tmp / "data" / "shard_000").spec, seed=42))
    save_model(tmp / "m.npz", [a if fill is None else np.full_like(a, fill) for a in arrays], {})


def write_bomb(path: Path, side: int = 30_000) -> None:
    """A PNG that claims side x side pixels (a decompression bomb), in a few bytes: header and an empty body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def picture_folder(tmp: Path, bomb: bool = False) -> None:
    from PIL import Image

    for name, colour in (("cats", 30), ("dogs", 220)):
        (tmp / "pics" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (12, 12), colour).save(tmp / "pics" / name / f"{i}.png")
    if bomb:
        write_bomb(tmp / "pics" / "dogs" / "bomb.png")


def write_checkpoint(tmp: Path, meta: dict) -> None:
    """results/checkpoint.npz whose metadata has only `meta`."""
    from shared.modelfile import to_npy, write_npz

    (tmp / "results").mkdir()
    write_npz(tmp / "results" / "checkpoint.npz", {"meta": to_npy(np.array(json.dumps(meta)))})


MLP_TASK = """
import torch
from torch import nn
METRICS = {{"f1": "ratio"}}

def build_model(spec):
    c, h, w = spec.shape
    return {model}

def train(model, data, config):
    return {result}
"""
MLP = "nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, spec.num_classes))"


def task_module(text: str, server: bool = False, task: str = "t") -> Setup:
    """tmp/task/t.py with `text`, TASK=t; with `server`, a server of that task runs (for what only a
    round shows: what train returns)."""

    def setup(tmp: Path, held: ExitStack) -> dict[str, str]:
        from flowerpot.launcher import Process, clean_env

        (tmp / "task").mkdir()
        (tmp / "task" / "t.py").write_text(text)
        env = {"TASK": task, "TASK_DIR": str(tmp / "task")}
        if server:
            address = free_address()
            server_env = {**ONE_SHARD, **env, "SERVER_LISTEN_ADDRESS": address, "RESULTS_DIR": str(tmp / "server")}
            proc = Process("server", ["-m", "flowerpot", "server"], clean_env(**server_env), tmp)
            held.callback(proc.stop)
            proc.wait_for("listening on")
            env["SERVER_ADDRESS"] = address
        return env

    return setup


def mlp_task(model: str = MLP, result: str = '{"loss": 1.0}', server: bool = False) -> Setup:
    return task_module(MLP_TASK.format(model=model, result=result), server)


# Secure aggregation's smallest valid round: what each of its cases changes one thing of.
SECURE = {"SECURE_AGGREGATION": "true", "MIN_FIT_CLIENTS": "3", "MIN_AVAILABLE_CLIENTS": "3"}

CASES = [
    # the user's task (TASK, TASK_DIR): checked at start, before connecting, where it can be
    Case(
        "task-not-importable",
        ["client"],
        {"TASK": "nowhere", **CLIENT},
        2,
        "TASK=nowhere cannot be imported: no module nowhere",
    ),
    Case(
        "task-dir-missing",
        ["client"],
        {"TASK": "t", "TASK_DIR": "no-such-folder"},
        2,
        "TASK_DIR=no-such-folder is not a folder",
    ),
    Case(
        "task-name-malformed",
        ["client"],
        {"TASK": "my-task.py"},
        2,
        "TASK='my-task.py' is not valid: use a module name",
    ),
    Case(
        "task-raises-on-import",
        ["client"],
        CLIENT,
        2,
        "TASK=t raised ZeroDivisionError on import: division by zero: fix the module",
        task_module("1 / 0\n"),
    ),
    Case(
        "task-needs-a-package",
        ["client"],
        CLIENT,
        2,
        "TASK=t needs the package not_installed_here, which is not installed: add it to a requirements.txt",
        task_module("import not_installed_here\n"),
    ),
    Case(
        "task-without-build-model",
        ["client"],
        CLIENT,
        2,
        "TASK=t has no build_model: define build_model(spec)",
        task_module("def train(model, data, config):\n    return {}\n"),
    ),
    Case(
        "task-object-missing",
        ["client"],
        CLIENT,
        2,
        "TASK=t:Task: the module t has no Task",
        task_module("x = 1\n", task="t:Task"),
    ),
    Case(
        "task-model-not-a-module",
        ["client"],
        CLIENT,
        2,
        "TASK=t: build_model returned list, not a torch nn.Module",
        mlp_task(model="[1, 2]"),
    ),
    Case(
        "task-model-wrong-output",
        ["client"],
        CLIENT,
        2,
        "TASK=t: the model's output for 2 images of shape (1, 8, 8) is (2, 3), not (2, 10)",
        mlp_task(model="nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 3))"),
    ),
    Case(
        "task-forward-raises",
        ["client"],
        CLIENT,
        2,
        "TASK=t: the model's forward pass on a batch of shape (2, 1, 8, 8) raised RuntimeError",
        mlp_task(model="nn.Linear(5, 10)"),
    ),
    Case(
        "task-metrics-unknown-type",
        ["client"],
        CLIENT,
        2,
        "TASK=t: METRICS gives f1 the unknown type 'percent': use 'ratio' or 'number'",
        task_module('METRICS = {"f1": "percent"}\ndef build_model(spec):\n    pass\n'),
    ),
    Case("device-unknown", ["client"], {"DEVICE": "tpu"}, 2, "DEVICE='tpu' is not valid: use cpu, cuda or cuda:N"),
    Case(
        "device-without-gpu",
        ["client"],
        {"DEVICE": "cuda"},
        2,
        "DEVICE=cuda, but torch sees no CUDA GPU on this machine: set DEVICE=cpu",
    ),
    # what only a round shows: train's result, with a server of that task running
    Case(
        "task-train-returns-no-loss",
        ["client"],
        ONE_SHARD,
        2,
        "TASK=t: train returned no 'loss' in round 1",
        mlp_task(result='{"f1": 0.5}', server=True),
    ),
    Case(
        "task-train-loss-not-finite",
        ["client"],
        ONE_SHARD,
        2,
        "TASK=t: train returned loss=nan in round 1: lower LEARNING_RATE",
        mlp_task(result='{"loss": float("nan")}', server=True),
    ),
    Case(
        "task-train-metric-wrong-type",
        ["client"],
        ONE_SHARD,
        2,
        "TASK=t: train returned f1='high' (str) in round 1: return a number",
        mlp_task(result='{"loss": 1.0, "f1": "high"}', server=True),
    ),
    Case(
        "task-train-ratio-above-one",
        ["client"],
        ONE_SHARD,
        2,
        "TASK=t: train returned f1=3.0 in round 1, outside [0, 1]",
        mlp_task(result='{"loss": 1.0, "f1": 3}', server=True),
    ),
    Case(
        "task-train-undeclared-metric",
        ["client"],
        ONE_SHARD,
        2,
        "TASK=t: train returned the metric 'recall', which METRICS does not declare",
        mlp_task(result='{"loss": 1.0, "recall": 0.5}', server=True),
    ),
    Case(
        "predict-task-not-importable",
        ["predict", "--test-split"],
        {"TASK": "nowhere"},
        2,
        "TASK=nowhere cannot be imported",
    ),
    Case(
        "initial-model-of-another-task",
        ["server"],
        {"INITIAL_MODEL": "m.npz", "TASK": "other"},
        2,
        "INITIAL_MODEL=m.npz is a model of TASK=builtin, the run's TASK=other",
        doing(write_model),
    ),
    # settings: one per kind of mistake, for each command that reads them
    Case(
        "rounds-not-a-number", ["server"], {"NUM_ROUNDS": "abc"}, 2, "NUM_ROUNDS='abc' is not valid: use a whole number"
    ),
    Case(
        "fraction-too-big",
        ["client"],
        {"FRACTION_FIT": "1.5"},
        2,
        "FRACTION_FIT='1.5' is not valid: use a number > 0 and <= 1",
    ),
    Case(
        "unknown-strategy", ["server"], {"STRATEGY": "fedfoo"}, 2, "STRATEGY='fedfoo' is not valid: use one of fedavg"
    ),
    Case(
        "unknown-dataset", ["prepare"], {"DATASET": "imagenet"}, 2, "DATASET='imagenet' is not valid: use one of digits"
    ),
    Case("unknown-partition", ["prepare"], {"PARTITION": "random"}, 2, "PARTITION='random' is not valid"),
    Case("alpha-zero", ["prepare"], {"DIRICHLET_ALPHA": "0"}, 2, "DIRICHLET_ALPHA='0' is not valid: use a number > 0"),
    Case(
        "min-fit-above-available",
        ["server"],
        {"MIN_FIT_CLIENTS": "4"},
        2,
        "MIN_FIT_CLIENTS=4 is above MIN_AVAILABLE_CLIENTS=3",
    ),
    Case(
        "available-above-capacity",
        ["server"],
        {"MAX_CLIENTS": "2"},
        2,
        "MIN_AVAILABLE_CLIENTS=3 is above MAX_CLIENTS=2",
    ),
    Case(
        "address-without-port",
        ["client"],
        {"SERVER_ADDRESS": "server"},
        2,
        "SERVER_ADDRESS='server' is not valid: use HOST:PORT",
    ),
    Case(
        "port-out-of-range",
        ["server"],
        {"SERVER_LISTEN_ADDRESS": "0.0.0.0:70000"},
        2,
        "SERVER_LISTEN_ADDRESS='0.0.0.0:70000'",
    ),
    Case(
        "tls-not-a-bool", ["server"], {"TLS_ENABLED": "maybe"}, 2, "TLS_ENABLED='maybe' is not valid: use true or false"
    ),
    Case(
        "auth-without-tls",
        ["client"],
        {"CLIENT_AUTH": "certificate"},
        2,
        "CLIENT_AUTH=certificate needs TLS_ENABLED=true",
    ),
    Case("folder-without-path", ["prepare"], {"DATASET": "folder"}, 2, "DATASET=folder needs FOLDER_PATH"),
    Case("shard-id-too-big", ["client"], {"SHARD_ID": "7"}, 2, "SHARD_ID=7 is not below NUM_SHARDS=3"),
    *(
        Case(
            f"clients-per-process-{value}",
            ["client"],
            {"CLIENTS_PER_PROCESS": value},
            2,
            f"CLIENTS_PER_PROCESS='{value}' is not valid: use a whole number from 1 to 1000",
        )
        for value in ("0", "-3", "1001", "many")
    ),
    Case(
        "shard-id-with-logical-clients",
        ["client"],
        {"SHARD_ID": "1", "CLIENTS_PER_PROCESS": "5"},
        2,
        "SHARD_ID=1 names one shard, and CLIENTS_PER_PROCESS=5 logical clients need one each: leave SHARD_ID empty",
    ),
    # differential privacy: its settings, what a shard or task cannot do privately (DP=record),
    # and what DP=client cannot combine with
    Case("dp-unknown", ["client"], {"DP": "maybe"}, 2, "DP='maybe' is not valid: use one of off, record, client"),
    Case(
        "dp-noise-too-small",
        ["client"],
        {"DP": "record", "DP_NOISE_MULTIPLIER": "0"},
        2,
        "DP_NOISE_MULTIPLIER='0' is not valid: use a number from 0.1 to 100",
    ),
    Case(
        "dp-clip-norm-zero",
        ["client"],
        {"DP": "record", "DP_CLIP_NORM": "0"},
        2,
        "DP_CLIP_NORM='0' is not valid: use a number > 0",
    ),
    Case("dp-delta-one", ["client"], {"DP_DELTA": "1"}, 2, "DP_DELTA='1' is not valid: use a number > 0 and < 1"),
    Case(
        "dp-budget-negative",
        ["server"],
        {"DP_EPSILON_BUDGET": "-1"},
        2,
        "DP_EPSILON_BUDGET='-1' is not valid: use a number > 0",
    ),
    Case(
        "dp-delta-too-large-for-the-shard",
        ["client"],
        {**CLIENT, "DP": "record", "DP_DELTA": "0.01"},
        2,
        "DP_DELTA=0.01 is not well below 1/479 for the 479 training examples of shard_000: set DP_DELTA at most",
    ),
    Case(
        "dp-task-with-its-own-train",
        ["client"],
        {**CLIENT, "DP": "record"},
        2,
        "DP=record: TASK=t brings its own train, whose loop cannot be made private from outside: remove train",
        mlp_task(),
    ),
    Case(
        "dp-batchnorm",
        ["client"],
        {**CLIENT, "DP": "record"},
        2,
        "DP=record: TASK=t's model has the layer 1 (BatchNorm2d), which DP-SGD cannot train",
        task_module(
            "from torch import nn\n\ndef build_model(spec):\n    c, h, w = spec.shape\n    return nn.Sequential("
            "nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * h * w, spec.num_classes))\n"
        ),
    ),
    Case(
        "dp-metrics-unknown",
        ["client"],
        {"DP": "record", "DP_METRICS": "some"},
        2,
        "DP_METRICS='some' is not valid: use one of sent, withheld",
    ),
    Case(
        "dp-ledger-dir-not-writable",
        ["client"],
        {**CLIENT, "DP": "record", "DP_LEDGER_DIR": "a-file/ledgers"},
        2,
        "DP_LEDGER_DIR=a-file/ledgers cannot be written (Not a directory): make it a writable folder",
        make("a-file", file=True),
    ),
    Case(
        "dp-client-async",
        ["server"],
        {"DP": "client", "MODE": "async"},
        2,
        "DP=client is defined for sync rounds (one noisy average per round), not MODE=async: set MODE=sync",
    ),
    Case(
        "dp-client-robust-strategy",
        ["server"],
        {"DP": "client", "STRATEGY": "fedmedian", "MIN_FIT_CLIENTS": "3", "MIN_AVAILABLE_CLIENTS": "3"},
        2,
        "DP=client adds its noise to an equal-weight average of the clipped updates, which STRATEGY=fedmedian "
        "does not make: set STRATEGY=fedavg or fedprox, or DP=record",
    ),
    Case(
        "dp-client-with-clip-norm",
        ["server"],
        {"DP": "client", "CLIP_NORM": "5"},
        2,
        "CLIP_NORM=5 with DP=client: DP_CLIP_NORM clips every update under DP=client: set CLIP_NORM=0",
    ),
    Case(
        "dp-client-delta-for-max-clients",
        ["server"],
        {"DP": "client", "DP_DELTA": "0.01", "MAX_CLIENTS": "100"},
        2,
        "DP_DELTA=0.01 is not well below 1/100 for the MAX_CLIENTS=100 clients DP=client protects: "
        "set DP_DELTA at most 5.0e-03",
    ),
    # secure aggregation: bad values, and what it cannot combine with
    Case(
        "secagg-threshold-half",
        ["server"],
        {**SECURE, "SECAGG_THRESHOLD": "0.5"},
        2,
        "SECAGG_THRESHOLD='0.5' is not valid: use a number > 0.5 and <= 1",
    ),
    Case(
        "secagg-bits-too-many",
        ["client"],
        {
            **SECURE,
            "SECAGG_QUANTIZATION_BITS": "40",
        },
        2,
        "SECAGG_QUANTIZATION_BITS='40' is not valid: use a whole number from 8 to 30",
    ),
    Case(
        "secagg-odd-neighbours",
        ["server"],
        {**SECURE, "SECAGG_NEIGHBOURS": "5"},
        2,
        "SECAGG_NEIGHBOURS=5: a ring's neighbourhood has as many on each side: set an even number",
    ),
    Case(
        "secagg-async",
        ["server"],
        {**SECURE, "MODE": "async"},
        2,
        "SECURE_AGGREGATION=true needs a cohort that shares keys before any of it sends its input",
    ),
    Case(
        "secagg-robust-strategy",
        ["server"],
        {
            **SECURE,
            "STRATEGY": "krum",
            "KRUM_MALICIOUS_CLIENTS": "0",
        },
        2,
        "STRATEGY=krum compares individual updates, which SECURE_AGGREGATION=true hides from the server",
    ),
    Case(
        "secagg-dp-client",
        ["server"],
        {
            **SECURE,
            "DP": "client",
            "DP_DELTA": "1e-5",
        },
        2,
        "DP=client clips each update at the server, which SECURE_AGGREGATION=true hides from it: set DP=record",
    ),
    Case(
        "secagg-clip-norm",
        ["server"],
        {**SECURE, "CLIP_NORM": "2"},
        2,
        "CLIP_NORM=2 clips each update at the server, which SECURE_AGGREGATION=true hides: set CLIP_NORM=0",
    ),
    Case(
        "secagg-quorum",
        ["server"],
        {**SECURE, "FIT_QUORUM": "0.8"},
        2,
        "FIT_QUORUM=0.8: under SECURE_AGGREGATION=true every client that shared its keys is waited for",
    ),
    Case(
        "secagg-two-clients",
        ["server"],
        {"SECURE_AGGREGATION": "true", "MIN_FIT_CLIENTS": "2"},
        2,
        "MIN_FIT_CLIENTS=2: with 2 clients in a round each can tell the other's update from the sum and its own",
    ),
    Case(
        "dp-client-over-budget",
        ["server"],
        {"DP": "client", "DP_EPSILON_BUDGET": "1", "NUM_ROUNDS": "50", "FRACTION_FIT": "1"},
        2,
        "DP_EPSILON_BUDGET=1: NUM_ROUNDS=50 at FRACTION_FIT=1 and DP_NOISE_MULTIPLIER=1 spend epsilon",
    ),
    Case(
        "negative-timeout", ["server"], {"START_TIMEOUT": "-5"}, 2, "START_TIMEOUT='-5' is not valid: use seconds > 0"
    ),
    # data
    Case(
        "data-dir-missing",
        ["client"],
        {"DATA_DIR": "nowhere"},
        2,
        "DATA_DIR=nowhere does not exist: run `flowerpot prepare`",
    ),
    Case(
        "data-dir-empty",
        ["client"],
        {"DATA_DIR": "empty"},
        2,
        "DATA_DIR=empty holds no shards",
        make("empty"),
    ),
    Case(
        "shard-corrupt",
        ["client"],
        ONE_SHARD,
        2,
        "train.npz is corrupt (checksum mismatch): run `flowerpot prepare` again",
        corrupt("shard_000/train.npz"),
    ),
    Case("shard-file-missing", ["client"], ONE_SHARD, 2, "test.npz is missing", remove("shard_000/test.npz")),
    Case(
        "shard-metadata-corrupt",
        ["client"],
        ONE_SHARD,
        2,
        "shard.json is corrupt",
        corrupt("shard_000/shard.json", b"{"),
    ),
    Case("no-free-shard", ["client"], {}, 3, "all 3 shards in DATA_DIR=data are claimed", all_shards_claimed),
    Case(
        "evaluate-split-without-validation",
        ["client"],
        {**CLIENT, "EVALUATE_SPLIT": "validation"},
        2,
        "EVALUATE_SPLIT=validation: shard_000 has no validation split: run `flowerpot prepare` with "
        "VALIDATION_FRACTION above 0",
    ),
    Case(
        "evaluate-split-unknown",
        ["server"],
        {"EVALUATE_SPLIT": "train"},
        2,
        "EVALUATE_SPLIT='train' is not valid: use one of test, validation",
    ),
    Case(
        "shards-of-other-settings",
        ["prepare"],
        {"NUM_SHARDS": "4"},
        2,
        "holds shards made with other settings (NUM_SHARDS differ)",
    ),
    Case(
        "too-many-shards",
        ["prepare"],
        {"DATA_DIR": "fresh", "NUM_SHARDS": "500"},
        2,
        "cannot give NUM_SHARDS=500 shards of at least MIN_SHARD_SIZE=20",
    ),
    Case(
        "too-many-labels",
        ["prepare"],
        {"DATA_DIR": "fresh", "PARTITION": "pathological", "LABELS_PER_CLIENT": "11"},
        2,
        "LABELS_PER_CLIENT=11 is more than the 10 labels",
    ),
    Case(
        "image-folder-missing",
        ["prepare"],
        {"DATA_DIR": "fresh", "DATASET": "folder", "FOLDER_PATH": "pics"},
        2,
        "FOLDER_PATH=pics is not a folder",
    ),
    # places and network
    Case(
        "results-not-writable",
        ["server"],
        {"RESULTS_DIR": "a-file/results"},
        2,
        "RESULTS_DIR=a-file/results cannot be written (Not a directory)",
        make("a-file", file=True),
    ),
    Case(
        "port-in-use",
        ["server"],
        {},
        2,
        "cannot be bound (the port is in use",
        occupied_port,
    ),
    Case(
        "metrics-port-in-use",
        ["server"],
        {},
        2,
        "cannot be bound on 127.0.0.1 (Address already in use): stop what uses it, choose another port, or 0",
        occupied_metrics_port,
    ),
    Case("metrics-port-not-a-port", ["server"], {"METRICS_PORT": "99999"}, 2, "METRICS_PORT='99999' is not valid"),
    Case(
        "address-does-not-resolve",
        ["client"],
        {**CLIENT, "SERVER_ADDRESS": "no-such-host.invalid:8080"},
        5,
        "(the name no-such-host.invalid does not resolve)",
    ),
    Case(
        "server-not-there",
        ["client"],
        CLIENT,
        5,
        "was not reachable within CONNECT_TIMEOUT=2 s (connection refused)",
        address_of_nothing,
    ),
    Case(
        "tls-without-certificates",
        ["server"],
        {"TLS_ENABLED": "true"},
        2,
        "TLS_ENABLED=true but certs/server.pem is missing: create the certificates with `flowerpot certs`",
    ),
    Case(
        "client-without-its-certificate",
        ["client"],
        {"TLS_ENABLED": "true", "CLIENT_AUTH": "certificate", "CLIENT_NAME": "x"},
        2,
        "is missing: create the certificates",
    ),
    Case(
        "no-clients-come",
        ["server"],
        {"START_TIMEOUT": "1"},
        6,
        "only 0 of MIN_AVAILABLE_CLIENTS=3 clients connected within START_TIMEOUT=1 s",
        listen_somewhere_free,
    ),
    # other commands
    Case(
        "predict-without-model", ["predict", "--test-split"], {}, 2, "no model at results/final_model.npz: train first"
    ),
    Case(
        "predict-nothing-to-do", ["predict", "--model", "m.npz"], {}, 2, "give image files to classify, or --test-split"
    ),
    Case("certs-bad-owner", ["certs", "--owner", "me"], {}, 2, "--owner 'me': use UID:GID"),
    Case("env-file-missing", ["--env-file", "nope.env", "server"], {}, 2, "--env-file nope.env does not exist"),
    # security: mutual TLS, certificates, secure by default
    Case(
        "require-tls-in-plaintext",
        ["server"],
        {"REQUIRE_TLS": "true"},
        2,
        "REQUIRE_TLS=true but the server would run without TLS_ENABLED=true and CLIENT_AUTH=certificate: make "
        "certificates with `flowerpot certs --client NAME`",
    ),
    Case(
        "require-tls-without-client-auth",
        ["server"],
        {"REQUIRE_TLS": "true", "TLS_ENABLED": "true"},
        2,
        "REQUIRE_TLS=true but the server would run without CLIENT_AUTH=certificate",
    ),
    Case(
        "require-tls-not-a-bool", ["server"], {"REQUIRE_TLS": "yes please"}, 2, "REQUIRE_TLS='yes please' is not valid"
    ),
    Case("allow-insecure-not-a-bool", ["server"], {"ALLOW_INSECURE": "2"}, 2, "ALLOW_INSECURE='2' is not valid"),
    Case(
        "connections-per-client-negative",
        ["server"],
        {"MAX_CONNECTIONS_PER_CLIENT": "-1"},
        2,
        "MAX_CONNECTIONS_PER_CLIENT='-1' is not valid: use a whole number",
    ),
    Case("cert-hosts-with-space", ["certs"], {"CERT_HOSTS": "my host.example"}, 2, "CERT_HOSTS='my host.example'"),
    Case("certs-owner-too-big", ["certs", "--owner", "99999999999:1"], {}, 2, "--owner '99999999999:1': use UID:GID"),
    Case("certs-owner-negative", ["certs", "--owner=-5:-5"], {}, 2, "--owner '-5:-5': use UID:GID"),
    Case(
        "ca-passphrase-wrong",
        ["certs"],
        {"CA_PASSPHRASE": "wrong"},
        2,
        "CA_PASSPHRASE does not decrypt certs/ca/ca.key",
        ca_with_passphrase("right"),
    ),
    Case(
        "ca-passphrase-missing",
        ["certs"],
        {},
        2,
        "certs/ca/ca.key is encrypted: set CA_PASSPHRASE",
        ca_with_passphrase("right"),
    ),
    Case(
        "certs-sign-not-a-request",
        ["certs", "--sign", "x.csr"],
        {},
        2,
        "--sign x.csr is not a PEM certificate request",
        make("x.csr", file=True),
    ),
    # transport limits
    Case(
        "keepalive-too-short",
        ["server"],
        {"KEEPALIVE_SECONDS": "1"},
        2,
        "KEEPALIVE_SECONDS='1' is not valid: use a whole number from 5 to 3600",
    ),
    Case(
        "keepalive-not-a-number",
        ["client"],
        {**CLIENT, "KEEPALIVE_SECONDS": "soon"},
        2,
        "KEEPALIVE_SECONDS='soon' is not valid: use a whole number from 5 to 3600",
    ),
    Case(
        "keepalive-too-long",
        ["server"],
        {"KEEPALIVE_SECONDS": "1e9"},
        2,
        "KEEPALIVE_SECONDS='1e9' is not valid: use a whole number from 5 to 3600",
    ),
    Case("max-message-zero", ["server"], {"MAX_MESSAGE_MB": "0"}, 2, "MAX_MESSAGE_MB='0' is not valid: use a whole"),
    # inputs that once ended in a traceback, and the limits that bound what a client may claim
    Case(
        "start-timeout-huge", ["server"], {"START_TIMEOUT": "1e13"}, 2, "START_TIMEOUT='1e13' is not valid: use seconds"
    ),
    Case(
        "connect-timeout-huge",
        ["client"],
        {"CONNECT_TIMEOUT": "1e300"},
        2,
        "CONNECT_TIMEOUT='1e300' is not valid: use seconds > 0 and <= 604800",
    ),
    Case(
        "env-file-not-utf8",
        ["--env-file", "bad.env", "server"],
        {},
        2,
        "--env-file bad.env is not UTF-8 text (line 2): save it as UTF-8",
        doing(lambda t: (t / "bad.env").write_bytes(b"NUM_ROUNDS=2\nCLIENT_NAME=caf\xe9\n")),
    ),
    Case(
        "env-file-dev-null-is-no-settings",
        ["--env-file", "/dev/null", "server"],
        {"START_TIMEOUT": "1"},
        6,
        "only 0 of MIN_AVAILABLE_CLIENTS=3 clients connected within START_TIMEOUT=1 s",
        listen_somewhere_free,
    ),
    Case(
        "predict-image-bomb",
        ["predict", "--model", "m.npz", "bomb.png"],
        {},
        2,
        "bomb.png is too large an image (DecompressionBombError",
        doing(write_model, lambda t: write_bomb(t / "bomb.png")),
    ),
    Case(
        "folder-image-bomb",
        ["prepare"],
        {"DATA_DIR": "fresh", "DATASET": "folder", "FOLDER_PATH": "pics"},
        2,
        "bomb.png is too large an image (DecompressionBombError",
        doing(lambda t: picture_folder(t, bomb=True)),
    ),
    Case(
        "predict-model-json-corrupt",
        ["predict", "--model", "m.npz", "--test-split"],
        {},
        2,
        "m.json is corrupt (JSONDecodeError): delete it",
        doing(write_model, lambda t: (t / "m.json").write_text("{")),
    ),
    Case(
        "predict-model-json-missing-keys",
        ["predict", "--model", "m.npz", "--test-split"],
        {},
        2,
        "m.json has no usable image spec (KeyError)",
        doing(write_model, lambda t: (t / "m.json").write_text('{"spec": {"dataset": "digits"}}')),
    ),
    Case(
        "checkpoint-metadata-missing-keys",  # started afresh with a warning (or refused, exit 2)
        ["server"],
        {"START_TIMEOUT": "1"},
        6,
        "only 0 of MIN_AVAILABLE_CLIENTS=3 clients connected within START_TIMEOUT=1 s",
        doing(lambda t: write_checkpoint(t, {"round": 1, "parameters": 0, "strategy_state": {}}), free=True),
    ),
    Case("run-local-negative-clients", ["run-local", "--clients", "-1"], {}, 2, "--clients -1: run at least 1 client"),
    Case("run-local-no-clients", ["run-local", "--clients", "0"], {}, 2, "--clients 0: run at least 1 client"),
    Case(
        "max-client-examples-negative",
        ["server"],
        {"MAX_CLIENT_EXAMPLES": "-1"},
        2,
        "MAX_CLIENT_EXAMPLES='-1' is not valid: use a whole number from 0 to 1000000000000",
    ),
    Case(
        "update-norm-limit-zero",
        ["server"],
        {"UPDATE_NORM_LIMIT": "0"},
        2,
        "UPDATE_NORM_LIMIT='0' is not valid: use a number > 0",
    ),
    Case(
        "update-norm-limit-nan",
        ["server"],
        {"UPDATE_NORM_LIMIT": "nan"},
        2,
        "UPDATE_NORM_LIMIT='nan' is not valid: use a number > 0",
    ),
    Case(
        "update-norm-median-multiple-below-one",
        ["server"],
        {"UPDATE_NORM_MEDIAN_MULTIPLE": "0.5"},
        2,
        "UPDATE_NORM_MEDIAN_MULTIPLE='0.5' is not valid: use a number from 0 to 1000000.0 (0: off, otherwise",
    ),
    Case(
        "site-name-too-long",  # the server would cut it to 64 characters and log a name nobody gave
        ["client"],
        {"SITE_NAME": "s" * 7000},
        2,
        "SITE_NAME='ssssssssssssssssssssssssssssssssssssssss'... (7000 characters) is not valid: use a site name "
        "of at most 64 printable characters",
    ),
    Case(
        "client-name-with-a-newline",
        ["client"],
        {"CLIENT_NAME": "site-a\nround 5/5"},
        2,
        "CLIENT_NAME='site-a\\nround 5/5' is not valid: use a client name of at most 64 printable characters",
    ),
    Case(
        "initial-model-missing",
        ["server"],
        {"INITIAL_MODEL": "nope.npz"},
        2,
        "INITIAL_MODEL=nope.npz is not a file: point it at a model .npz",
    ),
    Case(
        "initial-model-not-finite",
        ["server"],
        {"INITIAL_MODEL": "m.npz"},
        2,
        "INITIAL_MODEL=m.npz holds no arrays, or non-numeric or non-finite ones",
        doing(lambda t: write_model(t, np.inf)),
    ),
    Case(
        "folder-without-example-bound",
        ["server"],
        {"DATASET": "folder", "FOLDER_PATH": "pics"},
        2,
        "DATASET=folder has no size the server knows, so it cannot bound the example counts clients claim: "
        "set MAX_CLIENT_EXAMPLES",
    ),
    # Sites
    Case("site-shards-malformed", ["prepare"], {"SITE_SHARDS": "a-b"}, 2, "SITE_SHARDS='a-b' is not valid: use shard"),
    Case("site-shards-backwards", ["client"], {"SITE_SHARDS": "2-1"}, 2, "SITE_SHARDS='2-1' is not valid: use shard"),
    Case("site-shards-empty-item", ["client"], {"SITE_SHARDS": "1,,2"}, 2, "SITE_SHARDS='1,,2' is not valid"),
    Case(
        "site-shards-above-num-shards",
        ["prepare"],
        {"SITE_SHARDS": "0,5", "NUM_SHARDS": "3"},
        2,
        "SITE_SHARDS=0,5 names a shard not below NUM_SHARDS=3: list shard numbers from 0 to NUM_SHARDS-1",
    ),
    # Who may claim which shard, and an allow-list that authenticates nobody
    Case("shard-owners-malformed", ["server"], {"SHARD_OWNERS": "site-a"}, 2, "SHARD_OWNERS='site-a' is not valid"),
    Case(
        "shard-owners-shared-shard",
        ["server"],
        {"SHARD_OWNERS": "a:0-1 b:1", "CLIENT_AUTH": "certificate", "TLS_ENABLED": "true"},
        2,
        "SHARD_OWNERS='a:0-1 b:1' is not valid",
    ),
    Case(
        "shard-owners-above-num-shards",
        ["server"],
        {"SHARD_OWNERS": "a:0 b:7", "NUM_SHARDS": "3", "CLIENT_AUTH": "certificate", "TLS_ENABLED": "true"},
        2,
        "SHARD_OWNERS=a:0 b:7 names a shard not below NUM_SHARDS=3",
    ),
    Case(
        "shard-owners-without-certificates",
        ["server"],
        {"SHARD_OWNERS": "a:0"},
        2,
        "SHARD_OWNERS=a:0 needs CLIENT_AUTH=certificate (it maps certificates to shards): set CLIENT_AUTH=certificate",
    ),
    Case(
        "allow-list-without-authentication-under-require-tls",
        ["server"],
        {"ALLOWED_CLIENTS": "site-a", "REQUIRE_TLS": "true", "ALLOW_INSECURE": "true"},
        2,
        "ALLOWED_CLIENTS=site-a with CLIENT_AUTH=none checks only the names clients give themselves",
    ),
    Case(
        "classes-only-one",
        ["prepare"],
        {"DATASET": "folder", "FOLDER_PATH": "pics", "CLASSES": "cat"},
        2,
        "CLASSES='cat' is not valid: use comma-separated class names in label order",
    ),
    Case(
        "classes-repeated",
        ["prepare"],
        {"DATASET": "folder", "FOLDER_PATH": "pics", "CLASSES": "cat,dog,cat"},
        2,
        "CLASSES='cat,dog,cat' is not valid: use comma-separated class names in label order",
    ),
    Case(
        "classes-folder-outside-the-list",
        ["prepare"],
        {"DATASET": "folder", "FOLDER_PATH": "pics", "CLASSES": "cat,fox", "DATA_DIR": "site"},
        2,
        "FOLDER_PATH=pics has class folder(s) dog that are not in CLASSES=cat,fox: add them to CLASSES",
        doing(lambda t: [(t / "pics" / c).mkdir(parents=True) for c in ("cat", "dog")]),
    ),
    # Docker Swarm: a client's wait for its machine's shards
    Case(
        "shards-timeout-negative",
        ["client"],
        {"SHARDS_TIMEOUT": "-1"},
        2,
        "SHARDS_TIMEOUT='-1' is not valid: use seconds from 0 to 604800",
    ),
    Case(
        "shards-timeout-not-a-number",
        ["client"],
        {"SHARDS_TIMEOUT": "soon"},
        2,
        "SHARDS_TIMEOUT='soon' is not valid: use seconds from 0 to 604800",
    ),
    Case(
        "shards-never-prepared",
        ["client"],
        {**CLIENT, "DATA_DIR": "empty", "SHARDS_TIMEOUT": "1"},
        2,
        "DATA_DIR=empty holds no prepared shards after SHARDS_TIMEOUT=1 s: run the prepare step on this machine",
        doing(lambda t: (t / "empty").mkdir()),
    ),
    # Robust strategies refused where they cannot defend, MIN_COMPLETION_RATE and CLIP_NORM
    Case(
        "krum-too-few-clients",
        ["server"],
        {"STRATEGY": "krum", "MIN_FIT_CLIENTS": "3", "KRUM_MALICIOUS_CLIENTS": "1"},
        2,
        "STRATEGY=krum needs MIN_FIT_CLIENTS >= 2*KRUM_MALICIOUS_CLIENTS+3 = 5, but MIN_FIT_CLIENTS=3",
    ),
    Case(
        "bulyan-too-few-clients",
        ["server"],
        {"STRATEGY": "bulyan", "MIN_FIT_CLIENTS": "5", "MIN_AVAILABLE_CLIENTS": "5", "KRUM_MALICIOUS_CLIENTS": "1"},
        2,
        "STRATEGY=bulyan needs MIN_FIT_CLIENTS >= 4*KRUM_MALICIOUS_CLIENTS+3 = 7, but MIN_FIT_CLIENTS=5",
    ),
    Case(
        "trimmedavg-trims-nothing",
        ["server"],
        {"STRATEGY": "fedtrimmedavg", "MIN_FIT_CLIENTS": "3", "TRIM_FRACTION": "0.2"},
        2,
        "STRATEGY=fedtrimmedavg trims nothing: int(TRIM_FRACTION*MIN_FIT_CLIENTS) = int(0.2*3) = 0",
    ),
    Case(
        "completion-rate-above-one",
        ["server"],
        {"MIN_COMPLETION_RATE": "1.5"},
        2,
        "MIN_COMPLETION_RATE='1.5' is not valid: use a number from 0 to 1",
    ),
    Case(
        "negative-clip-norm",
        ["server"],
        {"CLIP_NORM": "-1"},
        2,
        "CLIP_NORM='-1' is not valid: use a number from 0 to 1000000",
    ),
    # Asynchronous training's settings, and the robust strategies' rules on the buffer
    Case("unknown-mode", ["server"], {"MODE": "parallel"}, 2, "MODE='parallel' is not valid: use one of sync, async"),
    Case("buffer-size-zero", ["server"], {"BUFFER_SIZE": "0"}, 2, "BUFFER_SIZE='0' is not valid: use a whole number"),
    Case("negative-concurrency", ["server"], {"CONCURRENCY": "-1"}, 2, "CONCURRENCY='-1' is not valid"),
    Case("negative-max-staleness", ["server"], {"MAX_STALENESS": "-2"}, 2, "MAX_STALENESS='-2' is not valid"),
    Case(
        "unknown-staleness-weighting",
        ["server"],
        {"STALENESS_WEIGHTING": "hinge"},
        2,
        "STALENESS_WEIGHTING='hinge' is not valid: use one of constant, polynomial",
    ),
    Case("negative-staleness-exponent", ["server"], {"STALENESS_EXPONENT": "-1"}, 2, "STALENESS_EXPONENT='-1'"),
    Case("eval-every-zero", ["server"], {"EVAL_EVERY": "0"}, 2, "EVAL_EVERY='0' is not valid"),
    Case("keep-all-models-maybe", ["server"], {"KEEP_ALL_MODELS": "maybe"}, 2, "KEEP_ALL_MODELS='maybe' is not valid"),
    Case("slowdown-below-one", ["client"], {"CLIENT_SLOWDOWN": "0.5"}, 2, "CLIENT_SLOWDOWN='0.5' is not valid"),
    Case(
        "async-krum-small-buffer",
        ["server"],
        {"MODE": "async", "STRATEGY": "krum", "BUFFER_SIZE": "4", "KRUM_MALICIOUS_CLIENTS": "1"},
        2,
        "STRATEGY=krum needs BUFFER_SIZE >= 2*KRUM_MALICIOUS_CLIENTS+3 = 5, but BUFFER_SIZE=4: raise BUFFER_SIZE",
    ),
    Case(
        "async-trimmedavg-small-buffer",
        ["server"],
        {"MODE": "async", "STRATEGY": "fedtrimmedavg", "BUFFER_SIZE": "4", "TRIM_FRACTION": "0.2"},
        2,
        "STRATEGY=fedtrimmedavg trims nothing: int(TRIM_FRACTION*BUFFER_SIZE) = int(0.2*4) = 0",
    ),
    Case(
        "certs-sign-without-a-ca",
        ["certs", "--sign", "certs/requests/site-x.csr"],
        {},
        2,
        "--sign certs/requests/site-x.csr: there is no CA in certs/ca: sign where the CA is",
        doing(lambda t: __import__("flowerpot.certs").certs.request(t / "certs", "site-x")),
    ),
    Case("certs-sign-a-folder", ["certs", "--sign", "data"], {}, 2, "--sign data cannot be read (Is a directory)"),
    Case(
        "certs-issued-list-corrupt",
        ["certs", "--revoke", "site-x"],
        {},
        2,
        "certs/ca/issued.json is corrupt (JSONDecodeError): restore it from a backup",
        doing(
            lambda t: (t / "certs" / "ca").mkdir(parents=True), lambda t: (t / "certs/ca/issued.json").write_text("{")
        ),
    ),
    Case(
        "run-local-server-refuses-to-start",
        ["run-local", "--clients", "1"],
        {"REQUIRE_TLS": "true"},
        2,
        "REQUIRE_TLS=true but the server would run without TLS_ENABLED=true and CLIENT_AUTH=certificate",
    ),
]


@pytest.fixture
def held() -> Iterator[ExitStack]:
    """What a case's setup keeps open (sockets, shard claims) while the command runs."""
    with ExitStack() as stack:
        yield stack


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_clear_line_and_its_status(
    case: Case, tmp_path: Path, digits_shards: Path, held: ExitStack
) -> None:
    shutil.copytree(digits_shards, tmp_path / "data")
    extra = case.setup(tmp_path, held)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*"))
    result = run_cli(case.args, cwd=tmp_path, timeout=60, **{"DATA_DIR": "data", **case.env, **extra})
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == case.code, result.stderr
    assert len(errors) == 1, result.stderr
    assert case.message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*")) == before  # nothing lost


def test_case_names_are_unique() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
