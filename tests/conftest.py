"""Shared helpers: run `flowerpot` commands as real processes, and prepared digits shards; and
the kind of every test (the markers `unit`, `process`, `compose`, `bench`), checked as it runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# Every test is of exactly one kind, by what it uses (pyproject.toml registers the markers):
#   unit     nothing but this process: no child process, no Docker (`pytest -m unit`, the fast loop)
#   process  starts processes on this machine: flowerpot commands, federations, Python interpreters
#   compose  Docker: the CLI, Compose or Swarm against the engine
#   bench    runs the benchmark (`flowerpot bench --quick`)
# A test module or test says its kind with a marker (`pytestmark = pytest.mark.compose`); one that
# says none is `process` when it uses a fixture that starts processes, else `unit`. The kind is
# checked while the test runs, not trusted: a `unit` test that starts a process, or a test of
# another kind than `compose` that runs `docker`, fails and says which marker it needs.
KINDS = ("unit", "process", "compose", "bench")
PROCESS_FIXTURES = frozenset({"spawn", "federation", "digits_shards"})
_running: tuple[str, str] | None = None  # (the running test's id, its kind), for the audit hook


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kinds = {mark.name for mark in item.iter_markers() if mark.name in KINDS}
        if len(kinds) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {' and '.join(sorted(kinds))}: give it one kind")
        uses_processes = bool(PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())))
        if kinds == {"unit"} and uses_processes:
            raise pytest.UsageError(f"{item.nodeid} is marked unit but uses a fixture that starts processes")
        if not kinds:
            item.add_marker("process" if uses_processes else "unit")


def _kind(item: pytest.Item) -> str:
    return next(mark.name for mark in item.iter_markers() if mark.name in KINDS)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    global _running
    _running = (item.nodeid, _kind(item))
    try:
        return (yield)
    finally:
        _running = None


_STARTS_A_PROCESS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.system"})


def _program(event: str, args: tuple[Any, ...]) -> str:
    """The program an audit event starts: its file name, or "" when the event does not say."""
    if event == "subprocess.Popen":  # (executable, args, cwd, env)
        executable, argv = args[0], args[1]
        program = executable or (argv if isinstance(argv, str | bytes | os.PathLike) else next(iter(argv), ""))
    elif event in ("os.posix_spawn", "os.exec"):  # (path, argv, env)
        program = args[0]
    elif event == "os.system":  # (command,)
        program = os.fsdecode(args[0]).split(" ", 1)[0]
    else:
        return ""
    return os.path.basename(os.fsdecode(program))


def _check_kind(event: str, args: tuple[Any, ...]) -> None:
    """An audit hook: it sees every process this interpreter starts through subprocess, os.fork,
    os.exec*, os.posix_spawn or os.system, whoever calls them (the test, a library, a thread)."""
    if _running is None or event not in _STARTS_A_PROCESS:
        return
    test, kind = _running
    if kind == "unit":
        raise RuntimeError(f"{test} is marked unit but starts a process ({event}): mark it process")
    if kind != "compose" and _program(event, args) == "docker":
        raise RuntimeError(f"{test} is marked {kind} but runs docker: mark it compose")


# Matplotlib builds its font cache on a machine's first plot by running fc-list: built here,
# before the hook, a unit test that plots on a fresh machine is not taken for one starting a process.
import matplotlib.font_manager  # noqa: E402, F401

sys.addaudithook(_check_kind)


def pytest_terminal_summary(terminalreporter) -> None:
    if MEASUREMENTS:
        terminalreporter.section("measurements")
        for name, value in MEASUREMENTS.items():
            terminalreporter.write_line(f"{name}: {value}")
