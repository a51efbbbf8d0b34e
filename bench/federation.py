"""Run one federation as local processes for the benchmark, and watch its memory (PSS)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.local_run import free_port

REPO = Path(__file__).resolve().parent.parent


def base_env(**settings: Any) -> dict[str, str]:
    """A clean environment: no Flowerpot setting leaks in from the caller's shell."""
    from shared.settings import Settings

    names = {n.upper() for n in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", FLWR_TELEMETRY_ENABLED="0")
    env.update({k: str(v.resolve()) if isinstance(v, Path) else str(v) for k, v in settings.items()})
    return env


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (torch's libraries) count once across processes."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakPss:
    """Samples the PSS of some processes (and their children) until stopped; keeps each peak."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peaks, self._pids = interval, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self._pids[name] = pid

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for name, pid in list(self._pids.items()):
                total = sum(pss_kb(p) for p in [pid, *descendants(pid)])
                self.peaks[name] = max(self.peaks.get(name, 0), total)

    def __enter__(self) -> PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def descendants(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = [int(p) for p in fh.read().split()]
    except OSError:
        return []
    return children + [d for c in children for d in descendants(c)]


@dataclass
class Outcome:
    server_code: int
    client_codes: list[int]
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    peak_pss_mb: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.server_code == 0 and all(c == 0 for c in self.client_codes)


def run_federation(
    workdir: Path,
    clients: int,
    settings: dict[str, Any],
    reference: bool = False,
    timeout: float = 900,
    client_args: list[str] | None = None,
) -> Outcome:
    """A server (ours, or bare Flower with `reference`) and `clients` clients: Flowerpot's, or
    the Python module arguments in `client_args` (e.g. ["-m", "bench.trivial_client"]).

    Logs go to files in `workdir` (pipes would fill up with many processes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    defaults = {"RESULTS_DIR": workdir / "results", "MIN_AVAILABLE_CLIENTS": clients, "MAX_CLIENTS": max(clients, 10)}
    env = base_env(**{**defaults, **settings, "SERVER_LISTEN_ADDRESS": address, "SERVER_ADDRESS": address})
    server_cmd = ["-m", "bench.reference_server"] if reference else ["-m", "flowerpot", "server"]
    logs = []

    def start(name: str, args: list[str], extra: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed below)
        logs.append(log)
        return subprocess.Popen(
            [sys.executable, *args], env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT, cwd=workdir
        )

    started = time.monotonic()
    with PeakPss() as memory:
        server = start("server", server_cmd, {})
        memory.watch("server", server.pid)
        _wait_for_port(address, server, timeout=60)
        workers = [
            start(f"client-{i}", client_args or ["-m", "flowerpot", "client"], {"CLIENT_NAME": f"client-{i}"})
            for i in range(clients)
        ]
        for i, worker in enumerate(workers):
            memory.watch(f"client-{i}", worker.pid)
        try:
            server_code = server.wait(timeout=timeout)
            client_codes = [w.wait(timeout=60) for w in workers]
        finally:
            for proc in (server, *workers):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for log in logs:
                log.close()
    seconds = time.monotonic() - started
    history_file = workdir / "results" / ("reference.json" if reference else "history.json")
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    peaks = {name: kb / 1024 for name, kb in memory.peaks.items()}
    return Outcome(server_code, client_codes, seconds, history, peaks)


def _wait_for_port(address: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before listening")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the server did not listen on {address} within {timeout} s")


def prepare(data_dir: Path, **settings: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flowerpot", "prepare"],
        env=base_env(**{**settings, "DATA_DIR": data_dir}),
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"prepare failed: {result.stderr}")
