"""Bad settings and inputs, each through the real command line: one clear line on stderr that
names the problem and the fix, the documented exit status, and nothing lost."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import free_address, run_cli


@dataclass
class Case:
    name: str
    args: list[str]
    env: dict[str, str]
    code: int
    message: str
    setup: Callable[[Path], None] | None = None
    env_from: Callable[[Path], dict[str, str]] = field(default=lambda _: {})


def corrupt(relative: str, content: bytes = b"garbage") -> Callable[[Path], None]:
    return lambda tmp: (tmp / "data" / relative).write_bytes(content)


def remove(relative: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / "data" / relative).unlink()


def occupy_port(tmp: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    BUSY.append(sock)
    (tmp / "busy-port").write_text(str(sock.getsockname()[1]))


BUSY: list[socket.socket] = []
ONE_SHARD = {"NUM_SHARDS": "1", "MIN_AVAILABLE_CLIENTS": "1", "MIN_FIT_CLIENTS": "1", "MIN_EVALUATE_CLIENTS": "1"}
CLIENT = {"CONNECT_TIMEOUT": "2"}

CASES = [
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
        lambda t: (t / "empty").mkdir(),
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
    Case("no-free-shard", ["client"], {}, 3, "all 3 shards in DATA_DIR=data are claimed", None),
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
        lambda t: (t / "a-file").write_text("x"),
    ),
    Case(
        "port-in-use",
        ["server"],
        {},
        2,
        "cannot be bound (the port is in use",
        occupy_port,
        lambda t: {"SERVER_LISTEN_ADDRESS": f"127.0.0.1:{(t / 'busy-port').read_text()}"},
    ),
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
        None,
        lambda _: {"SERVER_ADDRESS": free_address()},
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
        None,
        lambda _: {"SERVER_LISTEN_ADDRESS": free_address()},
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
    # transport limits (issue 9)
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
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_clear_line_and_its_status(case: Case, tmp_path: Path, digits_shards: Path) -> None:
    shutil.copytree(digits_shards, tmp_path / "data")
    if case.setup is not None:
        case.setup(tmp_path)
    claims = []
    if case.name == "no-free-shard":
        from client.claim import claim_shard

        claims = [claim_shard(tmp_path / "data") for _ in range(3)]
        for claim in claims:
            claim.__enter__()
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*"))
    try:
        result = run_cli(
            case.args, cwd=tmp_path, timeout=60, **{"DATA_DIR": "data", **case.env, **case.env_from(tmp_path)}
        )
    finally:
        for claim in claims:
            claim.__exit__(None, None, None)
        for sock in BUSY:
            sock.close()
        BUSY.clear()
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == case.code, result.stderr
    assert len(errors) == 1, result.stderr
    assert case.message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*")) == before  # nothing lost


def test_the_table_is_long_enough() -> None:
    assert len(CASES) >= 25
