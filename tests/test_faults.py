"""Faults survived, with real processes on loopback: killed clients, a killed server, bad updates."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from conftest import federation_env, free_address
from flowerpot.launcher import LocalFederation, Process, clean_env, descendants
from shared.modelfile import load_model


def run_federation(federation, env: dict[str, str], clients: int = 3, during=None) -> LocalFederation:
    """A whole run; `during(server, clients)` acts on it while it goes on."""
    run = federation(env, clients)
    if during is not None:
        during(run.server, run.clients)
    assert run.server.wait(240) == 0, run.server.output
    return run


def history(tmp_path: Path) -> list[dict]:
    return json.loads((tmp_path / "results" / "history.json").read_text())


def test_server_killed_mid_run_resumes_with_strategy_state(spawn, federation, data_dir: Path, tmp_path: Path) -> None:
    """FedAdam keeps moments on the server; a resumed run must end where an undisturbed one does."""
    settings = {"STRATEGY": "fedadam", "SERVER_LEARNING_RATE": "0.01", "NUM_ROUNDS": "5", "LOCAL_EPOCHS": "4"}
    address = free_address()
    env = federation_env(data_dir, tmp_path / "calm", address, **settings)
    run_federation(federation, env)
    calm_model, calm_meta = load_model(tmp_path / "calm" / "results" / "final_model.npz")

    address = free_address()
    env = federation_env(data_dir, tmp_path, address, **settings, CONNECT_TIMEOUT="60")
    interrupted = federation(env, 3)
    first, clients = interrupted.server, interrupted.clients
    first.wait_for("round 3/5")
    first.popen.send_signal(signal.SIGKILL)
    first.wait()
    checkpointed = json.loads(np.load(tmp_path / "results" / "checkpoint.npz")["meta"].item())["round"]
    assert checkpointed == 3  # round 3 was logged, so its checkpoint was written before

    second = spawn(["server"], **env)
    assert second.wait(240) == 0, second.output
    assert [c.wait() for c in clients] == [0, 0, 0]
    assert f"resuming the unfinished run at round {checkpointed + 1} of 5" in second.output
    assert "initial parameters" not in second.output  # the weights came from the checkpoint
    run_id = json.loads((tmp_path / "results" / "run.json").read_text())["run_id"]
    assert f"run id {run_id}" in first.output and f"run id {run_id}" in second.output  # still the same run
    assert [r["round"] for r in history(tmp_path)] == [1, 2, 3, 4, 5]
    for client in clients:
        assert "lost the connection to the server" in client.output

    # Same seed, same shards, aggregation in a stable order: the resumed run ends exactly where
    # the undisturbed one did. Without FedAdam's restored moments it would not.
    model, meta = load_model(tmp_path / "results" / "final_model.npz")
    assert meta["eval_accuracy"] == calm_meta["eval_accuracy"]
    assert all(np.array_equal(a, b) for a, b in zip(model, calm_model))


def test_a_finished_run_or_other_settings_start_a_new_run(federation, data_dir: Path, tmp_path: Path) -> None:
    env = federation_env(data_dir, tmp_path, free_address(), NUM_ROUNDS="2", MIN_AVAILABLE_CLIENTS="2")
    server = run_federation(federation, env, clients=2).server
    assert "resuming" not in server.output
    again = run_federation(
        federation, {**env, "SERVER_LISTEN_ADDRESS": (a := free_address()), "SERVER_ADDRESS": a}, 2
    ).server
    assert "resuming" not in again.output and "starting 2 rounds" in again.output
    previous = sorted((tmp_path / "results" / "previous").iterdir())
    assert len(previous) == 1 and (previous[0] / "final_model.npz").is_file()  # the first run is kept
    assert len(history(tmp_path)) == 2


def test_a_client_killed_mid_round_does_not_stop_the_round(federation, data_dir: Path, tmp_path: Path) -> None:
    env = federation_env(data_dir, tmp_path, free_address(), NUM_ROUNDS="6", LOCAL_EPOCHS="15", CLIENT_RESTARTS="1")

    def kill_one_during_round_two(server: Process, workers: list[Process]) -> None:
        server.wait_for("round 1/6")
        for pid in descendants(workers[0].popen.pid):  # the training process under the supervisor
            os.kill(pid, signal.SIGKILL)

    workers = run_federation(federation, env, during=kill_one_during_round_two).clients
    rounds = history(tmp_path)
    assert rounds[1]["clients_failed"] == 1 and rounds[1]["clients_trained"] == 2
    assert "client crashed (killed by SIGKILL); restarting it (1 of 1)" in workers[0].output
    assert [w.wait() for w in workers] == [0, 0, 0]
    assert rounds[-1]["clients_evaluated"] == 3  # the restarted client is back by the end


def test_killed_clients_cost_less_than_a_point_of_accuracy(
    spawn, federation, digits_shards: Path, tmp_path: Path
) -> None:
    """Mean final accuracy over three seeds, with and without a client killed in round 2."""
    import shutil

    from conftest import run_cli

    outcomes: dict[str, list[float]] = {"calm": [], "disturbed": []}
    for seed in ("1", "2", "3"):
        data = tmp_path / f"data-{seed}"
        assert run_cli(["prepare"], cwd=tmp_path, DATA_DIR=str(data), SEED=seed).returncode == 0
        for kind in outcomes:
            place = tmp_path / f"{kind}-{seed}"
            env = federation_env(
                data, place, free_address(), SEED=seed, NUM_ROUNDS="5", LOCAL_EPOCHS="10", CLIENT_RESTARTS="1"
            )

            def kill(server: Process, workers: list[Process]) -> None:
                server.wait_for("round 1/5")
                for pid in descendants(workers[1].popen.pid):
                    os.kill(pid, signal.SIGKILL)

            run_federation(federation, env, during=kill if kind == "disturbed" else None)
            outcomes[kind].append(history(place)[-1]["eval_accuracy"])
        shutil.rmtree(data)
    calm, disturbed = np.mean(outcomes["calm"]), np.mean(outcomes["disturbed"])
    print(f"final accuracy over 3 seeds: undisturbed {calm:.4f}, one client killed {disturbed:.4f}")
    assert abs(calm - disturbed) <= 0.01


def test_when_all_clients_are_gone_the_server_stops_and_frees_its_port(spawn, data_dir: Path, tmp_path: Path) -> None:
    address = free_address()
    env = federation_env(
        data_dir, tmp_path, address, NUM_ROUNDS="50", LOCAL_EPOCHS="5", REJOIN_TIMEOUT="3", MIN_AVAILABLE_CLIENTS="2"
    )
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    workers = [spawn(["client"], **env) for _ in range(2)]
    server.wait_for("round 2/50")
    started = time.monotonic()
    for worker in workers:
        worker.popen.send_signal(signal.SIGKILL)
    assert server.wait(60) == 6
    assert time.monotonic() - started < 20
    assert "were connected within REJOIN_TIMEOUT=3 s: restart clients, or lower MIN_FIT_CLIENTS" in server.output
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.bind((host, int(port)))  # the port is free again


EVIL_CLIENT = """
import sys
import numpy as np
from flwr.compat.client.app import start_client
from flwr.compat.client.numpy_client import NumPyClient

start = [a for a in np.load(sys.argv[2]).values()]

class Evil(NumPyClient):
    def get_parameters(self, config):
        return start
    def fit(self, parameters, config):
        poison = {1: [np.full_like(p, np.nan) for p in parameters], 2: [np.zeros(3, np.float32)],
                  3: [np.full_like(p, np.inf) for p in parameters]}[int(config["server_round"])]
        return poison, 100, {}
    def evaluate(self, parameters, config):
        return 1.0, 1, {"accuracy": 0.0}

start_client(server_address=sys.argv[1], client=Evil().to_client())
"""


def test_bad_updates_are_refused_and_the_model_stays_finite(spawn, data_dir: Path, tmp_path: Path) -> None:
    from client.data.shards import load_shard
    from client.tasks import get_weights, load_task

    spec = load_shard(data_dir / "shard_000").spec
    np.savez(tmp_path / "start.npz", *get_weights(load_task().new_model(spec, seed=42)))
    address = free_address()
    env = federation_env(
        data_dir, tmp_path, address, MIN_AVAILABLE_CLIENTS="3", NUM_ROUNDS="3", FRACTION_EVALUATE="0.01"
    )
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    good = [spawn(["client"], **env, CLIENT_NAME=f"good-{i}") for i in (1, 2)]
    script = tmp_path / "evil.py"
    script.write_text(textwrap.dedent(EVIL_CLIENT))
    evil = subprocess.Popen([sys.executable, str(script), address, str(tmp_path / "start.npz")], env=clean_env())
    try:
        assert server.wait(120) == 0, server.output
    finally:
        evil.kill()
    rounds = history(tmp_path)
    assert [(r["clients_trained"], r["updates_refused"]) for r in rounds] == [(2, 1)] * 3
    assert "holds NaN or Inf values" in server.output and "it has 1 arrays, the model has 8" in server.output
    model, _ = load_model(tmp_path / "results" / "final_model.npz")
    assert all(np.isfinite(a).all() for a in model)
    assert [g.wait() for g in good] == [0, 0]


def test_max_message_size_is_a_setting_and_overflows_are_explained(spawn, tmp_path: Path) -> None:
    """A CIFAR-10-shaped model (about 2 MB) against a server that accepts at most 1 MiB."""
    import pickle

    from conftest import run_cli

    batches = tmp_path / "raw" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    gen = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": gen.integers(0, 256, (6, 3072), dtype=np.uint8), "labels": list(range(6))}
        (batches / name).write_bytes(pickle.dumps(batch))
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in batches.iterdir()}  # trust these batches
    (tmp_path / "sums.json").write_text(json.dumps(sums))
    data = {"DATASET": "cifar10", "DOWNLOAD_DIR": str(tmp_path / "raw"), "NUM_SHARDS": "1", "MIN_SHARD_SIZE": "5"}
    trusted = {"FLOWERPOT_TEST_CHECKSUMS": str(tmp_path / "sums.json")}
    assert run_cli(["prepare"], cwd=tmp_path, DATA_DIR=str(tmp_path / "data"), **data, **trusted).returncode == 0
    one_client = {"MIN_AVAILABLE_CLIENTS": "1", "MIN_FIT_CLIENTS": "1", "MIN_EVALUATE_CLIENTS": "1"}
    env = federation_env(tmp_path / "data", tmp_path, free_address(), **data, **one_client, REJOIN_TIMEOUT="3")
    server = spawn(["server"], **{**env, "MAX_MESSAGE_MB": "1"})
    server.wait_for("listening on")
    client = spawn(["client"], **env)
    assert client.wait(60) == 2
    assert "is larger than MAX_MESSAGE_MB allows" in client.output
    assert "set the same, larger MAX_MESSAGE_MB on the server and the clients" in client.output
    assert server.wait(60) == 6
    assert "or its message was larger than MAX_MESSAGE_MB=1 allows" in server.output
