"""Poisoning attacks by one authenticated client (a certificate proves who sends, not what), with
real processes and gRPC on loopback: two honest Flowerpot clients and one attacker, a plain Flower NumPyClient.

For each attack the run completes, the final model stays finite, and the accuracy on the honest
clients' test splits (their own final evaluation) is within 2 points of a run without the attacker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import federation_env, free_address
from flowerpot.launcher import Process, clean_env
from shared.modelfile import load_model

pytestmark = pytest.mark.process  # every test here shares a real honest run

ATTACKER = """
import sys
import numpy as np
from flwr.compat.client.app import start_client
from flwr.compat.client.numpy_client import NumPyClient

attack, start = sys.argv[2], [a for a in np.load(sys.argv[3]).values()]

class Attacker(NumPyClient):
    def get_parameters(self, config):
        return [np.zeros((2, 2), np.float32)] if attack == "initial" else start
    def fit(self, parameters, config):
        if attack == "weights":
            return [np.full_like(p, 1e30) for p in parameters], 400, {}
        if attack == "fit-count":  # the untrained model, claimed over 10**12 examples
            return start, 10**12, {}
        if attack == "metrics":
            # under the size at which the server refuses a message unread (about 1.4 MiB for this
            # model; a 20 MiB metric is refused that way), so the metric checks themselves are met
            return parameters, 1, {"blob": "x" * (600 * 2**10), "shard": "y" * (300 * 2**10), "train_loss": 0.5}
        return parameters, 1, {}  # otherwise nearly no weight in training
    def evaluate(self, parameters, config):
        if attack == "eval-count":
            return 1.0, -240, {"accuracy": 0.5}
        if attack == "eval-accuracy":
            return 0.0, 10**12, {"accuracy": 1.0}
        if attack == "eval-nan":
            return float("nan"), 100, {"accuracy": 7.0}
        return 1.0, 1, {"accuracy": 0.0}

start_client(server_address=sys.argv[1], client=Attacker().to_client())
"""

HONEST = ("good-0", "good-1")


def run(data_dir: Path, place: Path, attack: str | None, **settings: str) -> tuple[Process, list[dict]]:
    """A run with the two honest clients on shards 0 and 1, and the attacker if any."""
    place.mkdir(parents=True, exist_ok=True)
    address = free_address()
    env = federation_env(
        data_dir, place, address, MIN_AVAILABLE_CLIENTS="3" if attack else "2", NUM_ROUNDS="3", **settings
    )
    server = Process("server", ["-m", "flowerpot", "server"], clean_env(**env), place)
    procs: list = [server]
    try:
        server.wait_for("listening on", 120)
        if attack:
            script = place / "attacker.py"
            script.write_text(textwrap.dedent(ATTACKER))
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), address, attack, str(data_dir.parent / "start.npz")],
                    env=clean_env(),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for i, name in enumerate(HONEST):
            env_i = clean_env(**env, CLIENT_NAME=name, SITE_NAME=name, SHARD_ID=str(i))  # two sites: two votes
            procs.append(Process(name, ["-m", "flowerpot", "client"], env_i, place))
        assert server.wait(300) == 0, server.output
        assert [p.wait(60) for p in procs[-2:]] == [0, 0], [p.output for p in procs[-2:]]
    finally:
        for proc in procs:
            proc.kill() if isinstance(proc, subprocess.Popen) else proc.stop()
    return server, json.loads((place / "results" / "history.json").read_text())


def honest_accuracy(history: list[dict]) -> float:
    last = [c for c in history[-1]["clients"] if c["phase"] == "evaluate" and c["client"] in HONEST]
    assert len(last) == 2
    return sum(c["metrics"]["accuracy"] * c["num_examples"] for c in last) / sum(c["num_examples"] for c in last)


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """Prepared shards, the attacker's starting weights, and the honest-only final accuracy."""
    from client.data.shards import load_shard
    from client.tasks import get_weights, load_task
    from conftest import run_cli

    root = tmp_path_factory.mktemp("attacks")
    data = root / "data"
    assert run_cli(["prepare"], cwd=root, DATA_DIR=str(data), NUM_SHARDS="3").returncode == 0
    np.savez(root / "start.npz", *get_weights(load_task().new_model(load_shard(data / "shard_000").spec, seed=42)))
    _, history = run(data, root / "honest", None)
    return data, honest_accuracy(history)


ATTACKS = {
    "weights": "moves the model by",
    "fit-count": "claims 1000000000000 training examples, more than the 1797",
    "eval-count": "refused the evaluation of client",
    "eval-accuracy": "claims 1000000000000 test examples",
    "eval-nan": "refused the evaluation of client",
    "initial": "its initial parameters differ from those of 2 agreeing participant(s)",
    "metrics": "dropped metrics of client",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_one_attacker_cannot_poison_or_crash_the_run(attack: str, honest_run, tmp_path: Path) -> None:
    data, honest = honest_run
    server, history = run(data, tmp_path, attack)
    assert ATTACKS[attack] in server.output
    model, meta = load_model(tmp_path / "results" / "final_model.npz")
    assert all(np.isfinite(a).all() for a in model)
    attacked = honest_accuracy(history)
    print(f"{attack}: honest-only {honest:.4f}, with the attacker {attacked:.4f}")
    assert abs(attacked - honest) <= 0.02
    assert 0.0 <= meta["eval_accuracy"] <= 1.0
    assert abs(meta["eval_accuracy"] - attacked) <= 0.05  # the logged final accuracy is not the attacker's
    if attack == "metrics":
        assert (tmp_path / "results" / "history.json").stat().st_size < 200_000
        assert (tmp_path / "results" / "checkpoint.npz").stat().st_size < 2_000_000


def test_pinned_initial_model_is_the_clients_own_seeded_model(honest_run, tmp_path: Path) -> None:
    """`flowerpot init-model` writes what every client builds: a run pinned to it ends where the agreed one did."""
    from conftest import run_cli

    data, honest = honest_run
    written = run_cli(["init-model", "--out", "start.npz"], cwd=tmp_path, DATA_DIR=str(data))
    assert written.returncode == 0, written.stderr
    server, history = run(data, tmp_path, None, INITIAL_MODEL=str(tmp_path / "start.npz"))
    assert "initial parameters from INITIAL_MODEL=" in server.output
    assert honest_accuracy(history) == honest


def test_in_async_mode_a_poisoned_update_is_refused_as_well(honest_run, tmp_path: Path) -> None:
    """The update checks measure an async update from the version it was trained on."""
    data, _ = honest_run
    server, history = run(data, tmp_path, "weights", MODE="async", BUFFER_SIZE="2")
    assert "moves the model by" in server.output and "refused the update of client" in server.output
    model, _ = load_model(tmp_path / "results" / "final_model.npz")
    assert all(np.isfinite(a).all() for a in model)
    assert sum(r["updates_refused"] for r in history) >= 1
    # The attacker answers at once, but counts once per version: it cannot fail the versions.
    assert all(r["updates_refused"] <= 1 and "failed" not in r for r in history)
    assert honest_accuracy(history) >= 0.9
