"""Shared helpers: run `flowerpot` commands as real processes, and prepared digits shards."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowerpot.launcher import LocalFederation, Process, clean_env, free_port

REPO = Path(__file__).resolve().parent.parent
PLAIN_CLIENT = REPO / "tests" / "plain_client.py"  # a plain Flower NumPyClient, nothing of Flowerpot's

# Small and fast: what the integration tests share unless they say otherwise.
BASE_ENV = {
    "NUM_ROUNDS": "3",
    "NUM_SHARDS": "3",
    "MIN_AVAILABLE_CLIENTS": "3",
    "MIN_FIT_CLIENTS": "2",
    "MIN_EVALUATE_CLIENTS": "2",
    "START_TIMEOUT": "60",
    "REJOIN_TIMEOUT": "30",
    "CONNECT_TIMEOUT": "30",
    "ROUND_TIMEOUT": "60",
}


def federation_env(data_dir: Path, tmp_path: Path, address: str, **overrides: str) -> dict[str, str]:
    """BASE_ENV for a server and its clients on `address`, shards in data_dir, results in tmp_path."""
    return {
        **BASE_ENV,
        "DATA_DIR": str(data_dir),
        "RESULTS_DIR": str(tmp_path / "results"),
        "SERVER_LISTEN_ADDRESS": address,
        "SERVER_ADDRESS": address,
        **overrides,
    }


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    """spawn(args, **env) starts `flowerpot args` in tmp_path; all are stopped at the end."""
    procs: list[Process] = []

    def start(args: list[str], cwd: Path | None = None, **env: str) -> Process:
        name = f"{args[0]}-{len(procs) + 1}"
        procs.append(Process(name, ["-m", "flowerpot", *args], clean_env(**env), cwd or tmp_path))
        return procs[-1]

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture
def federation(tmp_path: Path) -> Iterator:
    """federation(env, clients=N) starts the server of `env` (on its SERVER_ADDRESS) and N clients
    named client-1..N through the project's launcher; all are stopped at the end."""
    made: list[LocalFederation] = []

    def start(env: dict[str, str], clients: int = 0) -> LocalFederation:
        made.append(LocalFederation(env, cwd=tmp_path, address=env["SERVER_ADDRESS"]))
        made[-1].start(clients)
        return made[-1]

    yield start
    for fed in made:
        fed.stop()


def run_cli(args: list[str], cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowerpot", *args],
        env=clean_env(**env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three IID digits shards, prepared once; copy before changing them."""
    data = tmp_path_factory.mktemp("digits") / "data"
    result = run_cli(["prepare"], cwd=data.parent, DATA_DIR=str(data), NUM_SHARDS="3")
    assert result.returncode == 0, result.stderr
    return data


@pytest.fixture
def data_dir(digits_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared digits shards."""
    target = tmp_path / "data"
    shutil.copytree(digits_shards, target)
    return target


def free_address() -> str:
    return f"127.0.0.1:{free_port()}"


# Numbers the tests measure along the way (build times, image sizes, run times), printed at the
# end of the run. Measured, not asserted: speed targets belong to the benchmark.
MEASUREMENTS: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    if MEASUREMENTS:
        terminalreporter.section("measurements")
        for name, value in MEASUREMENTS.items():
            terminalreporter.write_line(f"{name}: {value}")
