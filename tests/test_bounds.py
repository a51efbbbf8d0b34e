"""One boosted update cannot wreck a run, and a wrecked run never exits 0: real processes and gRPC
on loopback, digits in 4 shards, 5 rounds, three honest Flowerpot clients and bench/attacker.py
(label flipping, its update stretched to L2 norm 950: under the old fixed UPDATE_NORM_LIMIT=1000,
about 100 times the digits model's own norm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import federation_env, free_address, run_cli
from flowerpot.launcher import Process, clean_env
from shared.errors import ExitCode

SHARDS = 4
SETTINGS = {
    "NUM_SHARDS": str(SHARDS),
    "NUM_ROUNDS": "5",
    "MIN_AVAILABLE_CLIENTS": str(SHARDS),
    "MIN_FIT_CLIENTS": str(SHARDS),
    "MIN_EVALUATE_CLIENTS": str(SHARDS),
}
BOOSTED = ["-m", "bench.attacker", "--attack", "labelflip", "--boost-norm", "950"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("bounds") / "data"
    assert run_cli(["prepare"], cwd=data.parent, DATA_DIR=str(data), NUM_SHARDS=str(SHARDS)).returncode == 0
    return data


def run(data: Path, place: Path, attacker: bool, **settings: str) -> tuple[Process, int]:
    """A run of 4 clients on shards 0-3 (the last one the attacker, if any): the server and its exit status."""
    place.mkdir(parents=True, exist_ok=True)
    address = free_address()
    env = federation_env(data, place, address, **SETTINGS, **settings)
    server = Process("server", ["-m", "flowerpot", "server"], clean_env(**env), place)
    clients: list[Process] = []
    try:
        server.wait_for("listening on", 120)
        for i in range(SHARDS):
            args = BOOSTED if attacker and i == SHARDS - 1 else ["-m", "flowerpot", "client"]
            clients.append(Process(f"c{i}", args, clean_env(**env, CLIENT_NAME=f"c{i}", SHARD_ID=str(i)), place))
        status = server.wait(600)
    finally:
        for proc in [*clients, server]:
            proc.stop()
    return server, status


def accuracy(data: Path, place: Path) -> float:
    """The final model's accuracy on every shard's test split, as a user measures it."""
    report = run_cli(
        ["predict", "--test-split", "--json", "--show", "0"],
        cwd=place, DATA_DIR=str(data), RESULTS_DIR=str(place / "results"),
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    return float(json.loads(report.stdout)["accuracy"])


@pytest.fixture(scope="module")
def honest(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> float:
    place = tmp_path_factory.mktemp("honest")
    server, status = run(shards, place, attacker=False)
    assert status == 0, server.output
    assert "refused the update" not in server.output  # the automatic bounds refuse no honest update
    return accuracy(shards, place)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_boosted_update_is_refused_and_the_model_stays_near_the_honest_one(
    mode: str, shards: Path, honest: float, tmp_path: Path
) -> None:
    extra = {"MODE": "async", "BUFFER_SIZE": str(SHARDS)} if mode == "async" else {}
    server, status = run(shards, tmp_path, attacker=True, **extra)
    assert status == 0, server.output
    assert "refused the update of client c3: it moves the model by 950" in server.output
    attacked = accuracy(shards, tmp_path)
    print(f"{mode}: honest {honest:.4f}, with the boosted attacker {attacked:.4f}")
    assert attacked >= honest - 0.05


def test_a_run_wrecked_under_a_loose_bound_is_rolled_back_and_does_not_exit_0(shards: Path, tmp_path: Path) -> None:
    """The operator's old fixed bound lets the boosted update in: the broken model is rolled back
    (logged), and a run whose last rounds all failed ends with RUN_FAILED and says so."""
    server, status = run(shards, tmp_path, attacker=True, UPDATE_NORM_LIMIT="1000", UPDATE_NORM_MEDIAN_MULTIPLE="0")
    assert status == ExitCode.RUN_FAILED, server.output
    assert "the global model is unusable" in server.output and "rolled back to that of round" in server.output
    last = server.output.strip().splitlines()[-1]
    assert "the run FAILED: its last 3 rounds all failed" in last, last
    history = json.loads((tmp_path / "results" / "history.json").read_text())
    assert all(r.get("failed") for r in history[-3:])
