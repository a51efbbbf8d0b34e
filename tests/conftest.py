"""Shared helpers: run `flowerpot` commands as real processes, and prepared digits shards."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

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


def clean_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without Flowerpot settings, plus `overrides`."""
    from bench.federation import base_env

    return base_env(**overrides)


class Proc:
    """A `python -m flowerpot ...` process whose merged output is collected as it arrives."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "flowerpot", *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float = 120) -> int:
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            self._reader.join(timeout=5)
            raise AssertionError(f"flowerpot {' '.join(self.args)} ran over {timeout} s:\n{self.output}") from None
        self._reader.join(timeout=5)
        return code

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output)
            if match:
                return match
            if self.popen.poll() is not None:
                self._reader.join(timeout=5)
                match = re.search(pattern, self.output)
                if match:
                    return match
                raise AssertionError(f"exited {self.popen.returncode} before {pattern!r}:\n{self.output}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    """spawn(args, **env) starts `flowerpot args` in tmp_path; all are stopped at the end."""
    procs: list[Proc] = []

    def start(args: list[str], cwd: Path | None = None, **env: str) -> Proc:
        proc = Proc(args, clean_env(**env), cwd or tmp_path)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


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
    from shared.local_run import free_port

    return f"127.0.0.1:{free_port()}"


# Numbers the tests measure along the way (build times, image sizes, run times), printed at the
# end of the run. Measured, not asserted: speed targets belong to the benchmark.
MEASUREMENTS: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    if MEASUREMENTS:
        terminalreporter.section("measurements")
        for name, value in MEASUREMENTS.items():
            terminalreporter.write_line(f"{name}: {value}")
