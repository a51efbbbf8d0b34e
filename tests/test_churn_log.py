"""Join and leave lines: each client's own while they are few, counted in a storm."""

from __future__ import annotations

import logging
import time

import pytest

from server.transport.churn_log import ChurnLog


def infos(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]


def test_a_few_joins_and_leaves_are_each_a_line(caplog: pytest.LogCaptureFixture) -> None:
    connected = [0]
    churn = ChurnLog(lambda: connected[0])
    with caplog.at_level(logging.INFO, logger="flowerpot.server"):
        for who in ("client-1", "client-2", "client-3"):
            connected[0] += 1
            churn.note(who, "joined")
        connected[0] -= 1
        churn.note("client-2", "left")
    assert infos(caplog) == [
        "client client-1 joined (1 connected)",
        "client client-2 joined (2 connected)",
        "client client-3 joined (3 connected)",
        "client client-2 left (2 connected)",
    ]


def test_a_storm_is_counted_into_one_line_at_the_windows_end(caplog: pytest.LogCaptureFixture) -> None:
    connected = [0]
    churn = ChurnLog(lambda: connected[0], lines=20, window=1.0)
    with caplog.at_level(logging.DEBUG, logger="flowerpot.server"):
        for i in range(300):
            connected[0] += 1
            churn.note(f"client-{i}", "joined")
        churn.note("client-7", "left")
        connected[0] -= 1
        time.sleep(1.3)  # the window's end: its summary comes without another event
    lines = infos(caplog)
    assert len(lines) == 21 and lines[19] == "client client-19 joined (20 connected)"
    assert lines[20].startswith("and 280 more client(s) joined, 1 left, within 1 s (299 connected)")
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 281  # every one still there at DEBUG
