"""The client's retry policy: waits grow, are bounded, end within CONNECT_TIMEOUT, and a refusal
is final (checked against a real Flowerpot gRPC server on loopback)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from flwr.compat.client.numpy_client import NumPyClient

from client import wiring
from client.retry import FIRST_DELAY, MAX_BACKOFF, Backoff
from conftest import free_address
from server.transport.admission import Admission, BoundedClientManager
from server.transport.wiring import FLOWER_SERVICE, Traffic, start_grpc_server
from shared.errors import Refused, Unreachable


def delays_until_giving_up(backoff: Backoff) -> list[float]:
    """Play the policy as the client does: sleep each granted wait, until none is granted."""
    granted = []
    while True:
        left = backoff.remaining()
        delay = backoff.next_delay()
        if delay is None:
            return granted
        assert delay <= left  # a wait is granted only when it ends before the deadline
        granted.append(delay)
        time.sleep(delay)


def test_the_defaults_start_short_and_are_bounded() -> None:
    assert 0 < FIRST_DELAY < MAX_BACKOFF <= 10


def test_waits_double_then_stay_at_the_longest() -> None:
    backoff = Backoff(budget=60, first=0.5, longest=5)
    assert [backoff.next_delay() for _ in range(7)] == [0.5, 1, 2, 4, 5, 5, 5]


def test_the_waits_end_within_the_budget_and_then_it_gives_up() -> None:
    backoff = Backoff(budget=1.0, first=0.05, longest=0.2)
    started = time.monotonic()
    granted = delays_until_giving_up(backoff)
    assert granted[:3] == [0.05, 0.1, 0.2] and max(granted) == 0.2
    assert sum(granted) <= 1.0
    assert time.monotonic() - started >= sum(granted)
    assert backoff.delay > backoff.remaining()  # the next wait would have ended past the deadline


def test_restart_counts_the_budget_afresh_from_the_shortest_wait() -> None:
    backoff = Backoff(budget=0.3, first=0.1, longest=1)
    delays_until_giving_up(backoff)
    assert backoff.next_delay() is None
    backoff.restart()
    assert backoff.remaining() > 0.2
    assert backoff.next_delay() == 0.1


class Idle(NumPyClient):
    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return []


@pytest.fixture
def allow_list_server() -> Iterator[str]:
    """A real Flowerpot gRPC server that admits only `site-a`."""
    address = free_address()
    server = start_grpc_server(
        BoundedClientManager(wait_timeout=5),
        Admission(capacity=5, allowed=frozenset({"site-a"})),
        Traffic(),
        address,
        max_message_bytes=1 << 20,
    )
    yield address
    server.stop(grace=None)


def test_a_refused_client_is_not_retried(allow_list_server: str, caplog: pytest.LogCaptureFixture) -> None:
    endpoint = wiring.Endpoint(address=allow_list_server, name="mallory", max_message_bytes=1 << 20, connect_timeout=30)
    caplog.set_level(logging.INFO)
    with pytest.raises(Refused, match="allow-list"):
        wiring.run(Idle().to_client(), endpoint)
    refusals = [r for r in caplog.records if r.name == "flowerpot.server" and "refused client" in r.getMessage()]
    assert len(refusals) == 1  # one try: a refusal ends it, well before CONNECT_TIMEOUT=30 s
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_the_handshake_probe_is_not_seated_as_a_client(caplog: pytest.LogCaptureFixture) -> None:
    """A client whose handshake failed asks gRPC why with a probe. The probe was a Join stream
    without join metadata: a server just starting seated it as a plain Flower client, sampled it
    into the resumed round and counted a failed fit when it left (seen in a resume test)."""
    address = free_address()
    manager = BoundedClientManager(wait_timeout=5)
    server = start_grpc_server(manager, Admission(capacity=5), Traffic(), address, max_message_bytes=1 << 20)
    caplog.set_level(logging.INFO)

    async def probe() -> str:
        channel = wiring._open_channel(
            wiring.Endpoint(address=address, name="probe", max_message_bytes=1 << 20, connect_timeout=5)
        )
        try:
            return await wiring._failure_details(channel)
        finally:
            await channel.close()

    try:
        assert asyncio.run(probe()) == ""  # the channel connects by now: no reason to give
    finally:
        server.stop(grace=None)
    assert "join metadata" not in caplog.text and "joined" not in caplog.text, caplog.text


def test_a_stream_cut_before_its_first_instruction_is_joined_again_only_after_a_wait() -> None:
    """gRPC cancels the streams it cannot queue in a join storm (10,000 clients): a client that
    joined again at once added to the storm (125,882 cancelled joins in one run). It now waits
    as for an unreachable server, the waits growing, and gives up within CONNECT_TIMEOUT."""
    joins: list[float] = []

    def cut(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        joins.append(time.monotonic())
        context.abort(grpc.StatusCode.CANCELLED, "queue full")
        yield b""  # never reached: a generator, as a stream handler must be

    address = free_address()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.stream_stream_rpc_method_handler(cut)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(FLOWER_SERVICE, {"Join": handler}),))
    server.add_insecure_port(address)
    server.start()
    try:
        endpoint = wiring.Endpoint(address=address, name="storm", max_message_bytes=1 << 20, connect_timeout=3)
        with pytest.raises(Unreachable, match="before its first instruction"):
            wiring.run(Idle().to_client(), endpoint)
    finally:
        server.stop(grace=None)
    assert 2 <= len(joins) <= 4, joins  # waits of 0.5, 1 and 2 s fit in 3 s; at once, hundreds would
    assert all(b - a >= 0.4 for a, b in itertools.pairwise(joins)), joins
