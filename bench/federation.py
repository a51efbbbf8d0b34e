"""Run one federation for the benchmark (through the project's one launcher), and watch its
memory (PSS)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.warm import WarmPopen
from flowerpot.launcher import CLIENT, SERVER, LocalFederation, clean_env, descendants
from shared.errors import ExitCode

REFERENCE_SERVER = ["-m", "bench.reference_server"]


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
        self.interval = interval
        self.peaks: dict[str, int] = {}  # KiB
        self._pids: dict[str, int] = {}
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


@dataclass
class BenchRun:
    server_code: int
    client_codes: list[int]
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    peak_pss_mb: dict[str, float] = field(default_factory=dict)
    reference: bool = False  # a bare Flower server

    @property
    def ok(self) -> bool:
        # A bare Flower server never tells Flowerpot clients that the run completed, so they
        # end with RUN_INCOMPLETE after a run that did; Flowerpot's own server does tell them.
        done = {ExitCode.OK, ExitCode.RUN_INCOMPLETE} if self.reference else {ExitCode.OK}
        return self.server_code == 0 and all(c in done for c in self.client_codes)


def run_federation(
    workdir: Path,
    clients: int,
    settings: dict[str, Any],
    reference: bool = False,
    timeout: float = 900,
    client_args: list[str] = CLIENT,
    warm: bool = False,
) -> BenchRun:
    """A server (ours, or bare Flower with `reference`) and `clients` clients (Flowerpot's, or
    `client_args`); logs go to files in `workdir`. `warm` forks the clients from the launcher's
    warm forkserver: for accuracy only, never where start-up or memory is measured (their PSS
    here would be the forkserver's shared pages, not a client's)."""
    workdir.mkdir(parents=True, exist_ok=True)
    defaults = {"RESULTS_DIR": workdir / "results", "MIN_AVAILABLE_CLIENTS": clients, "MAX_CLIENTS": max(clients, 10)}
    federation = LocalFederation(
        {**defaults, **settings},
        cwd=workdir,
        server_args=REFERENCE_SERVER if reference else SERVER,
        client_args=client_args,
        log_dir=workdir,
        popen=WarmPopen if warm else None,
    )
    started = time.monotonic()
    with PeakPss() as memory, federation:
        server = federation.start_server()
        memory.watch("server", server.pid)
        for i in range(clients):
            memory.watch(f"client-{i}", federation.start_client(i + 1).pid)
        server_code = federation.wait(timeout=timeout, client_grace=60)
        client_codes = [c.returncode if c.returncode is not None else -9 for c in federation.clients]
    history_file = workdir / "results" / ("reference.json" if reference else "history.json")
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    peaks = {name: kb / 1024 for name, kb in memory.peaks.items()}
    return BenchRun(server_code, client_codes, time.monotonic() - started, history, peaks, reference)


def prepare(data_dir: Path, **settings: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flowerpot", "prepare"],
        env=clean_env(**{**settings, "DATA_DIR": data_dir}),
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"prepare failed: {result.stderr}")
