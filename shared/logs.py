"""Logging set-up shared by every command: one readable format, Flower kept quiet."""

import logging
import os
import sys

# gRPC's core reports a refused TLS handshake only at INFO verbosity: the server asks for INFO
# and keeps only those reports of its INFO and WARNING lines (server/transport/handshake_log.py).
# True when it did.
GRPC_INFO_FOR_HANDSHAKES = False


def prepare_flower_environment(server: bool = False) -> None:
    """Call before importing flwr: no telemetry, and gRPC logs only real errors (the server: also
    its reports of refused handshakes). GRPC_VERBOSITY=DEBUG or INFO shows all of gRPC's lines.
    (flwr's import sets GRPC_VERBOSITY=error itself, which child processes inherit: a value that
    is present is no sign that the user chose it.)"""
    global GRPC_INFO_FOR_HANDSHAKES
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    chosen = os.environ.get("GRPC_VERBOSITY", "ERROR").upper()
    if server and chosen not in ("DEBUG", "INFO"):
        os.environ["GRPC_VERBOSITY"] = "INFO"
        GRPC_INFO_FOR_HANDSHAKES = True
    else:
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def _not_deprecation_banner(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("DEPRECATED FEATURE")


def setup_logging(level: str = "INFO", name: str = "flowerpot") -> logging.Logger:
    """Log to stderr as `time LEVEL name: message`; Flower's own chatter only from WARNING up."""
    root = logging.getLogger()
    if not any(getattr(h, "_flowerpot", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._flowerpot = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    return logging.getLogger(name)


def tame_flower(level: str = "INFO") -> None:
    """Route Flower's log through ours: its per-step INFO lines only at DEBUG, no banner.

    Call after flwr is imported: importing it sets its own level and console handler.
    """
    from flwr.supercore.logger import FLOWER_LOGGER

    for handler in list(FLOWER_LOGGER.handlers):
        FLOWER_LOGGER.removeHandler(handler)
    FLOWER_LOGGER.setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    FLOWER_LOGGER.addFilter(_not_deprecation_banner)
    FLOWER_LOGGER.propagate = True
