"""A Flowerpot server and N clients as local processes: the one launcher behind `run-local`, the
benchmark and the tests.

Each process's merged output is read by a thread as it arrives (a full pipe would stall a
chatty process), kept in memory for `wait_for`, and optionally relayed with a name prefix
(`run-local`) or written to a log file (the benchmark, with up to a hundred processes). The
environment is a clean one: Flowerpot settings of the caller's shell never leak in, so a run
is defined by the settings it is given.

The benchmark starts its clients warm, forked from a process that has imported torch and
Flower once: it passes its own `popen` (bench/warm.py); everything else starts plain processes.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent  # the checkout: children import its code
# Clients get this long after the server has ended to leave on their own, then they are stopped.
CLIENT_GRACE_SECONDS = 30
STOP_SECONDS = 10  # SIGTERM, then SIGKILL after this long


def free_port() -> int:
    """A port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**settings: Any) -> dict[str, str]:
    """This process's environment without any Flowerpot setting, plus `settings` (paths made
    absolute), with Flower's telemetry off and this checkout importable."""
    from shared.settings import Settings

    names = {n.upper() for n in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", FLWR_TELEMETRY_ENABLED="0")
    env.update({k: str(v.resolve()) if isinstance(v, Path) else str(v) for k, v in settings.items()})
    return env


def descendants(pid: int) -> list[int]:
    """The process ids under `pid` (children, grandchildren, ...), from /proc."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = [int(p) for p in fh.read().split()]
    except OSError:
        return []
    return children + [d for c in children for d in descendants(c)]


# What starts a process: subprocess.Popen's part that Process uses, given (args, env, cwd).
PopenFactory = Callable[[list[str], Mapping[str, str], Path], Any]


class Process:
    """`python ARGS...` with its merged output collected as it arrives; with `popen`, started by
    that factory instead (the benchmark's warm clients, bench/warm.py)."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: Mapping[str, str],
        cwd: Path,
        log_file: Path | None = None,
        relay: bool = False,
        popen: PopenFactory | None = None,
    ) -> None:
        self.name, self.args = name, args
        # Opened first: a log that cannot be written must not leave a started process behind.
        self._log = open(log_file, "w") if log_file else None  # noqa: SIM115 (closed by the reader)
        self.popen: Any
        if popen is not None:
            self.popen = popen(args, env, cwd)
        else:
            self.popen = subprocess.Popen(
                [sys.executable, *args], env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        self.lines: list[str] = []
        self._relay = relay
        self._reader = threading.Thread(target=self._read, name=f"output-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        try:
            for raw in self.popen.stdout:
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if self._log:
                    self._log.write(line)
                if self._relay:
                    sys.stderr.write(f"[{self.name}] {line}")
        finally:
            if self._log:
                self._log.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float | None = 120) -> int:
        """The exit status; a process still running after `timeout` is killed and reported."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"{self.name} ({' '.join(self.args)}) ran over {timeout} s:\n{self.output}") from None
        self._reader.join(timeout=5)
        return code

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The first match of `pattern` in the output; an error when the process exits or
        `timeout` passes without one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := re.search(pattern, self.output):
                return match
            if self.popen.poll() is not None:
                self._reader.join(timeout=5)
                if match := re.search(pattern, self.output):
                    return match
                raise AssertionError(f"{self.name} exited {self.popen.returncode} before {pattern!r}:\n{self.output}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no {pattern!r} within {timeout} s:\n{self.output}")

    def stop(self) -> None:
        """SIGTERM (the process cleans up), then SIGKILL if it is still there after STOP_SECONDS."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(timeout=5)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._reader.join(timeout=5)


SERVER = ["-m", "flowerpot", "server"]
CLIENT = ["-m", "flowerpot", "client"]


class LocalFederation:
    """A server on a free loopback port and numbered clients, all children of this process.

    `settings` are the Flowerpot settings of every process (the address is set here: a free
    port unless `address` is given). The
    server command can be another program that speaks Flower (the benchmark's bare Flower
    server), and so can the client command. With `popen`, clients are started by that factory
    (the benchmark's warm clients, bench/warm.py: for accuracy and robustness runs, never where
    start-up or memory is measured); the server is always a plain process.
    """

    def __init__(
        self,
        settings: Mapping[str, Any],
        cwd: Path,
        env_file: Path | None = None,
        server_args: list[str] = SERVER,
        client_args: list[str] = CLIENT,
        log_dir: Path | None = None,
        relay: bool = False,
        address: str | None = None,
        popen: PopenFactory | None = None,
    ) -> None:
        self.popen = popen
        self.address = address or f"127.0.0.1:{free_port()}"
        self.env = clean_env(**{**settings, "SERVER_LISTEN_ADDRESS": self.address, "SERVER_ADDRESS": self.address})
        self.cwd, self.log_dir, self.relay = cwd, log_dir, relay
        self.env_args = ["--env-file", os.fspath(env_file)] if env_file else []
        self.server_args, self.client_args = server_args, client_args
        self.server: Process | None = None
        self.clients: list[Process] = []

    def _start(self, name: str, args: list[str], env: Mapping[str, str], popen: PopenFactory | None = None) -> Process:
        if args[:2] == ["-m", "flowerpot"]:  # --env-file goes before the command
            args = [*args[:2], *self.env_args, *args[2:]]
        log_file = self.log_dir / f"{name}.log" if self.log_dir else None
        return Process(name, args, env, self.cwd, log_file=log_file, relay=self.relay, popen=popen)

    def start_server(self, wait_seconds: float = 60, **env: Any) -> Process:
        """Start the server and return once its port accepts connections."""
        self.server = self._start("server", self.server_args, {**self.env, **_strings(env)})
        wait_for_port(self.address, self.server, wait_seconds)
        return self.server

    def start_client(self, number: int | None = None, args: list[str] | None = None, **env: Any) -> Process:
        """Start client `number` (the next one by default), named client-NUMBER, with the
        federation's client command or `args`."""
        number = number or len(self.clients) + 1
        name = f"client-{number}"
        env = {**self.env, "CLIENT_NAME": name, **_strings(env)}
        client = self._start(name, args or self.client_args, env, popen=self.popen)
        self.clients.append(client)
        return client

    def start(self, clients: int) -> LocalFederation:
        self.start_server()
        for _ in range(clients):
            self.start_client()
        return self

    def wait(self, timeout: float | None = 900, client_grace: float = CLIENT_GRACE_SECONDS) -> int:
        """The server's exit status (the run's outcome); clients get `client_grace` seconds
        more to leave, then they are stopped."""
        assert self.server is not None, "start the server first"
        code = self.server.wait(timeout)
        deadline = time.monotonic() + client_grace
        for client in self.clients:
            try:
                client.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                client.stop()
        return code

    @property
    def client_codes(self) -> list[int | None]:
        return [c.returncode for c in self.clients]

    def stop(self) -> None:
        for proc in (*self.clients, *([self.server] if self.server else [])):
            proc.stop()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class NotListening(RuntimeError):
    """The server exited, or did not listen in time."""


def wait_for_port(address: str, process: Process, timeout: float) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise NotListening(f"{process.name} exited with {process.returncode} before listening:\n{process.output}")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise NotListening(f"{process.name} did not listen on {address} within {timeout} s")


def _strings(env: Mapping[str, Any]) -> dict[str, str]:
    return {k: os.fspath(v) if isinstance(v, Path) else str(v) for k, v in env.items()}


def every_client_refused_its_input(federation: LocalFederation) -> int | None:
    """Wait while the server runs; BAD_INPUT's status when every client exited with it first (a
    setting or a shard they refuse at start: the server would wait START_TIMEOUT for nobody)."""
    from shared.errors import ExitCode

    assert federation.server is not None
    while federation.server.popen.poll() is None:
        codes = [c.popen.poll() for c in federation.clients]
        if codes and all(code == ExitCode.BAD_INPUT for code in codes):
            return int(ExitCode.BAD_INPUT)
        if any(code is None for code in codes) or not codes:
            time.sleep(0.1)
            continue
        return None  # all gone, not all for bad input: the server's outcome says the rest
    return None


def run_local(settings: Any, clients: int, env_file: Path | None) -> int:
    """`flowerpot run-local`: prepare, then the server and `clients` clients with their output
    relayed; the server's exit status."""
    import logging

    from client.data.shards import prepare
    from shared.errors import Unreachable

    log = logging.getLogger("flowerpot.local")
    prepare(settings)
    # The settings came from the caller's environment and env file; the children read the same.
    passed = {k: v for k, v in os.environ.items() if k.lower() in type(settings).model_fields}
    with LocalFederation(passed, Path.cwd(), env_file=env_file, relay=True) as federation:
        log.info("server on %s with %d clients", federation.address, clients)
        try:
            federation.start(clients)
        except NotListening:
            if federation.server is not None and federation.server.returncode is not None:
                return federation.server.returncode  # it said why in its one line (relayed above)
            raise Unreachable(f"the server did not listen on {federation.address}: see its output above") from None
        refused = every_client_refused_its_input(federation)
        if refused is not None:
            log.warning("every client exited %d (bad input, said above): stopping the server", refused)
            assert federation.server is not None
            federation.server.stop()  # nothing else will join it
            code = refused
        else:
            code = federation.wait(timeout=None)  # as long as the run takes: its own waits are bounded
        failed = [f"{c.name} ({c.returncode})" for c in federation.clients if c.returncode != 0]
    if failed:
        log.warning("clients that did not exit 0: %s", ", ".join(failed))
    log.info("server exited with %d", code)
    return code
