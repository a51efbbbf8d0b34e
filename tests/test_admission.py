"""Admission on its own: capacity, the allow-list, releasing places, and many joins at once."""

from __future__ import annotations

import sys
import threading
import time

from flwr.server.superlink.fleet.grpc_bidi.grpc_bridge import GrpcBridge

from server.transport.admission import Admission, BoundedClientManager
from server.transport.stream import NamedClientProxy


def test_places_up_to_the_capacity_then_a_reason_that_names_max_clients() -> None:
    admission = Admission(capacity=2)
    assert [admission.take_place(), admission.take_place()] == [None, None]
    refusal = admission.take_place()
    assert refusal is not None
    assert "MAX_CLIENTS=2" in refusal and "raise MAX_CLIENTS" in refusal
    assert admission.connected == 2  # a refused client takes no place


def test_a_released_place_can_be_taken_again() -> None:
    admission = Admission(capacity=1)
    assert admission.take_place() is None
    assert admission.take_place() is not None
    admission.release()
    assert admission.connected == 0
    assert admission.take_place() is None
    assert admission.connected == 1


def test_the_allow_list_names_the_refused_client_and_the_setting() -> None:
    admission = Admission(capacity=5, allowed=frozenset({"site-a", "site-b"}))
    assert admission.not_allowed("site-a") is None
    refusal = admission.not_allowed("mallory")
    assert refusal is not None and "'mallory'" in refusal and "ALLOWED_CLIENTS" in refusal
    assert admission.connected == 0  # asking takes no place


def test_an_empty_allow_list_allows_any_name() -> None:
    assert Admission(capacity=1).not_allowed("anyone") is None


def test_concurrent_joins_never_exceed_the_capacity_and_all_places_come_back() -> None:
    admission, capacity, joiners = Admission(capacity=7), 7, 64
    start = threading.Barrier(joiners)
    outcomes: list[str | None] = []
    lock = threading.Lock()

    def join() -> None:
        start.wait()
        outcome = admission.take_place()
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=join) for _ in range(joiners)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(None) == capacity
    assert admission.connected == capacity

    leave = threading.Barrier(capacity)

    def release() -> None:
        leave.wait()
        admission.release()

    threads = [threading.Thread(target=release) for _ in range(capacity)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert admission.connected == 0


def test_counting_free_clients_while_others_join_and_leave_never_raises() -> None:
    """Flower's register changes the client dict outside its lock; a count iterating it (the
    live metrics' scrape) raised "dictionary changed size during iteration" in a join storm."""
    manager = BoundedClientManager(wait_timeout=1)
    resident = [NamedClientProxy(f"resident-{i}", GrpcBridge(), "r") for i in range(5000)]
    for proxy in resident:
        manager.register(proxy)
    stop, errors = threading.Event(), []

    def churn() -> None:
        i = 0
        while not stop.is_set():
            proxy = NamedClientProxy(f"churn-{i}", GrpcBridge(), "c")
            manager.register(proxy)
            manager.unregister(proxy)
            i += 1

    thread = threading.Thread(target=churn)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race shows at once
    thread.start()
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                assert manager.num_available() >= 5000
            except RuntimeError as exc:
                errors.append(exc)
                break
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert not errors, errors
