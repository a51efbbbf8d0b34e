"""gRPC keepalive, the same on both sides (server/transport/wiring.py and client/wiring.py)."""

from __future__ import annotations


def keepalive_options(seconds: float) -> list[tuple[str, int]]:
    """Ping the peer every `seconds`, also while no call is active, and close the connection
    when a ping is not answered within as long again: a peer that vanished without closing its
    connection is dropped within 2 x `seconds` (the server accepts pings 5 s apart)."""
    ms = int(seconds * 1000)
    return [
        ("grpc.keepalive_time_ms", ms),
        ("grpc.keepalive_timeout_ms", ms),
        ("grpc.http2.ping_timeout_ms", ms),  # gRPC 1.85 times unanswered pings with this, not keepalive_timeout
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
