"""Warm clients for the benchmark's federations: forked from a forkserver that has imported
torch and Flower once (see WarmPopen). Pass `WarmPopen` as `popen` to `flowerpot.launcher`'s
`Process` or `LocalFederation`."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import runpy
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from flowerpot.launcher import clean_env

# What a warm client finds already imported: everything `flowerpot client` and the benchmark's
# attacker import before they train (most of their 2.3 s of CPU at start). "launcher" first: the
# forkserver must find `_warm_main`. Not bench.attacker itself: runpy warns when the module it runs
# as __main__ is already imported from a package (its own code is small; its imports are here).
WARM_PRELOAD = ("flowerpot.launcher", "numpy", "torch", "grpc", "flwr", "flowerpot.cli", "bench.warm", "client.app")


def warm_context() -> multiprocessing.context.ForkServerContext:
    """Python's forkserver with WARM_PRELOAD imported, started on first use (one per process).

    The forkserver is a fresh interpreter (started with exec, not forked from this process, so
    this process's threads do not matter), with the environment a plain child would get from
    `clean_env()`: what torch, gRPC and OpenBLAS read while being imported is what a plain
    client would read.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WARM_PRELOAD))
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(clean_env(FLWR_TELEMETRY_ENABLED="0", GRPC_VERBOSITY="ERROR"))
        multiprocessing.forkserver.ensure_running()  # a no-op once it runs
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return context


class WarmPopen:
    """The part of `subprocess.Popen` that `Process` uses, for a process forked from a warm
    forkserver instead of started as a new interpreter.

    Why: in the benchmark's federations of local processes, each client spent about 2.3 s of CPU
    importing torch and Flower before doing anything; ten of them on two cores were about 11 s of
    a 14 s robustness run. A warm client is forked from Python's forkserver, which has imported them
    once, so it starts in a fraction of that and is still a real, separate OS process (own pid,
    signals, exit status) that speaks real gRPC to the server. Measured on the 2-core machine
    (2026-11-28, shared with another user's load): a federation of 10 clients, 5 rounds of 1 local
    epoch, took 21.7-29.8 s with plain clients (median 25.6 s) and 2.9-3.0 s warm (median 2.9 s),
    about 9x, with the same final accuracy (0.739) in all six runs; on a quieter machine 20.0 s
    against 2.2 s. The robustness section's 180 federations took 12.8 minutes warm.

    The caller's main module must be safe to import: multiprocessing imports it in every child
    as `__mp_main__` (`python -m flowerpot` and pytest are; a script needs the usual
    `if __name__ == "__main__":` guard).

    Where it must NOT be used: wherever process start-up or memory is the measurement. The
    benchmark's overhead and scale sections (start-up time, PSS per client) keep plain
    processes: a forked client shares the forkserver's pages, so its PSS is not a real client's,
    and its start-up is not what a user sees. `run-local` and the deployment keep them too.

    Fork safety, checked (tests/test_launcher_warm.py): the forkserver is a fresh interpreter
    that only imports WARM_PRELOAD; importing creates no gRPC channel or server and no torch
    thread pool (torch creates its OpenMP pool lazily, at the first parallel operation). The
    one thread importing creates is OpenBLAS's worker (numpy's BLAS), and OpenBLAS stops its
    pool before every fork (its pthread_atfork handler), so after the first client the
    forkserver runs one thread. What a fork shares that a new interpreter would draw afresh is
    reset in the child: numpy's global random state is reseeded (Python's `random` reseeds
    itself after a fork); all warm children share the forkserver's string-hash seed.

    Output: the child's stdout and stderr are a pipe read by `Process`, as with `Popen`. Exit
    status: the module's SystemExit code, or minus the signal that killed it, as with `Popen`.
    Only `-m MODULE ARGS...` commands can start warm.
    """

    def __init__(self, args: list[str], env: Mapping[str, str], cwd: Path) -> None:
        if len(args) < 2 or args[0] != "-m":
            raise ValueError(f"a warm process runs a module: args {args!r} must start with -m MODULE")
        context = warm_context()
        reader, writer = context.Pipe(duplex=False)
        self.args = args
        self._process = context.Process(
            target=_warm_main, args=(args[1:], dict(env), os.fspath(cwd), writer), name=args[1], daemon=True
        )
        self._process.start()
        writer.close()  # the child's copy is its only one: the pipe ends when the child does
        self.stdout = os.fdopen(os.dup(reader.fileno()), "rb")
        reader.close()
        self.pid: int = self._process.pid  # type: ignore[assignment]
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        code = self.poll()
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _warm_main(
    module_args: list[str], env: dict[str, str], cwd: str, out: multiprocessing.connection.Connection
) -> None:
    """In the forked child: what `python -m MODULE ARGS...` would do, minus the imports."""
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    out.close()
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = getattr(sys, name)
        if stream is not None and stream.fileno() == fd:
            stream.reconfigure(line_buffering=True, write_through=True)  # as PYTHONUNBUFFERED
        else:
            setattr(sys, name, open(fd, "w", buffering=1, closefd=False))  # noqa: SIM115
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.path.insert(0, cwd)  # as `python -m` puts the working folder first
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # fresh entropy, as a new interpreter would have
    sys.argv = list(module_args)
    runpy.run_module(module_args[0], run_name="__main__", alter_sys=True)
