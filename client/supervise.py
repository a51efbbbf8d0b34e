"""Restart a crashed client inside its container, but never a client that failed for a reason.

Docker's restart policies cannot tell a crash from a refusal: `on-failure` would restart a
client that the server refused, or that found no free shard, again and again. So the client
command can run the real client as a child process and restart it only when it crashed (died
by a signal, or exited 1 with a traceback), a bounded number of times.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys

from shared.errors import ExitCode

log = logging.getLogger("flowerpot.client")


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: the kernel kills it when the supervisor dies, so no worker is orphaned."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def supervise(child_argv: list[str], restarts: int) -> int:
    """Run `python -m flowerpot <child_argv>`; return its final exit status."""
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True  # an operator's stop: pass it on, and do not restart
        if child is not None:
            child.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = 0
    for attempt in range(restarts + 1):
        child = subprocess.Popen([sys.executable, "-m", "flowerpot", *child_argv], preexec_fn=_die_with_parent)
        code = child.wait()
        crashed = code < 0 or code == ExitCode.CRASH
        if stopping or not crashed:
            break
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else "exited with a traceback"
        if attempt < restarts:
            log.warning("client crashed (%s); restarting it (%d of %d)", how, attempt + 1, restarts)
        else:
            log.error("client crashed (%s) and used up its %d restarts (CLIENT_RESTARTS)", how, restarts)
    return 128 - code if code < 0 else code
