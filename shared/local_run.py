"""`flowerpot run-local`: the whole federation as local processes, for development and tests.

Prepares the shards, starts the server on a free loopback port and N clients, prefixes each
process's output with its name, and returns the server's exit status (the run's outcome).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from shared.settings import Settings

log = logging.getLogger("flowerpot.local")

CLIENT_GRACE_SECONDS = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_local(settings: Settings, clients: int, env_file: Path | None) -> int:
    from client.data.shards import prepare

    prepare(settings)
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "SERVER_LISTEN_ADDRESS": address, "SERVER_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "flowerpot", *(["--env-file", os.fspath(env_file)] if env_file else [])]
    log.info("server on %s with %d clients", address, clients)
    server = _start("server", [*base, "server"], env)
    workers = [
        _start(f"client-{i}", [*base, "client"], {**env, "CLIENT_NAME": f"client-{i}"}) for i in range(1, clients + 1)
    ]
    try:
        code = server.wait()
        for worker in workers:
            try:
                worker.wait(timeout=CLIENT_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                worker.terminate()
                worker.wait()
    finally:
        for proc in (server, *workers):
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    failed = [f"client-{i} ({w.returncode})" for i, w in enumerate(workers, 1) if w.returncode != 0]
    if failed:
        log.warning("clients that did not exit 0: %s", ", ".join(failed))
    log.info("server exited with %d", code)
    return code


def _start(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    threading.Thread(target=_relay, args=(name, proc.stdout), daemon=True).start()
    return proc


def _relay(name: str, stream: IO[str]) -> None:
    for line in stream:
        sys.stderr.write(f"[{name}] {line}")
