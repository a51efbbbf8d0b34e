"""Refused TLS handshakes in Flowerpot's log. gRPC Python gives the server no hook for them:
gRPC's core reports each one only on the process's stderr, at INFO verbosity, with the reason
(e.g. PEER_DID_NOT_RETURN_A_CERTIFICATE) but not the peer's address. So the server asks for
that verbosity (shared/logs.py) and reads what gRPC's core writes to stderr through a pipe: each
report becomes one warning of Flowerpot's, gRPC's other INFO and WARNING lines are dropped, and everything
else passes on to the real stderr. Python's own output (logging, tracebacks) keeps writing to
the real stderr directly, so nothing of it waits on the relay or is lost at exit."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time

from shared.protocol import MAX_TEXT, clean_text

log = logging.getLogger("flowerpot.server")

HANDSHAKE_FAILED = re.compile(r"Handshake failed with (?:fatal )?error (.*)$")
GRPC_INFO_LINE = re.compile(r"^[IW]\d{4} ")  # gRPC's INFO and WARNING lines
# A flood of bad handshakes must not flood the log: this many lines a minute, then a count.
LINES_PER_MINUTE = 20


class HandshakeReports:
    """One warning per refused handshake, at most LINES_PER_MINUTE a minute, the rest counted."""

    def __init__(self) -> None:
        self.window, self.logged, self.counted = time.monotonic(), 0, 0

    def report(self, reason: str) -> None:
        now = time.monotonic()
        if now - self.window >= 60:
            if self.counted:
                log.warning("%d more TLS handshakes failed in the last minute (not logged one by one)", self.counted)
            self.window, self.logged, self.counted = now, 0, 0
        if self.logged < LINES_PER_MINUTE:
            self.logged += 1
            log.warning(
                "a TLS handshake failed, the connection is refused: %s (gRPC does not say from which peer)",
                clean_text(reason, MAX_TEXT),
            )
        else:
            self.counted += 1


def relay_grpc_stderr(drop_info: bool) -> bool:
    """Route file descriptor 2 (gRPC's core writes there) through the relay; Python's sys.stderr
    and every logging handler on it keep the real stderr. `drop_info`: gRPC's INFO lines were
    asked for only for the handshake reports (its INFO and WARNING lines are dropped). False
    when the pipe could not be made (nothing changes then)."""
    try:
        real = os.dup(2)
        read_end, write_end = os.pipe()
    except OSError:
        return False
    stream = open(real, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8", errors="replace")  # noqa: SIM115
    old = sys.stderr
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is old:
            handler.setStream(stream)
    sys.stderr = stream
    os.dup2(write_end, 2)
    os.close(write_end)
    reports = HandshakeReports()

    def pump() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                found = HANDSHAKE_FAILED.search(line)
                if found is not None:
                    reports.report(found.group(1))
                elif not (drop_info and GRPC_INFO_LINE.match(line)):
                    os.write(real, raw)

    threading.Thread(target=pump, name="grpc-stderr", daemon=True).start()
    return True
