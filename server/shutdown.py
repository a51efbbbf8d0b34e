"""A stop (SIGTERM from `docker stop`, Ctrl-C) ends the server within seconds in every phase.

flowerpot.py turns SIGTERM into SystemExit in the main thread, which unwinds through `finally`
blocks. Inside Flower's round code that alone can take as long as ROUND_TIMEOUT: fit and evaluate
wait in thread pools whose `with` blocks join every worker on the way out, and each worker waits
on its client. So a stop first ends every client stream from another thread (the bridges close,
every wait inside Flower returns at once, the gRPC server cancels its calls), then unwinds as
before: results are flushed and clients see the server go. Should the unwinding still hang, a
watchdog ends the process after STOP_SECONDS, so `docker stop` never needs its SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import grpc
from flwr.server.client_manager import ClientManager

log = logging.getLogger("flowerpot.server")

STOP_SECONDS = 8.0  # below Docker's default 10 s between SIGTERM and SIGKILL
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_on_signal(grpc_server: grpc.Server, client_manager: ClientManager) -> Iterator[None]:
    """While the run goes on, SIGTERM and SIGINT end the client streams first, then act as before."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def on_stop(signum: int, frame: FrameType | None) -> None:
        log.warning("%s: stopping; ending every client stream", signal.Signals(signum).name)
        threading.Thread(target=end_streams, args=(grpc_server, client_manager), name="stop", daemon=True).start()
        _watchdog(128 + signum)
        handler = previous[signal.Signals(signum)]
        if callable(handler):
            handler(signum, frame)
        raise SystemExit(128 + signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def end_streams(grpc_server: grpc.Server, client_manager: ClientManager) -> None:
    """Close every client's bridge (what Flower's waits wait on) and cancel every gRPC call."""
    for proxy in list(client_manager.all().values()):
        bridge = getattr(proxy, "bridge", None)
        if bridge is not None:
            bridge.close()
    grpc_server.stop(grace=None)


def _watchdog(status: int) -> None:
    def expire() -> None:
        log.error("the server did not stop within %g s; exiting now", STOP_SECONDS)
        logging.shutdown()
        os._exit(status)

    timer = threading.Timer(STOP_SECONDS, expire)
    timer.daemon = True
    timer.start()
