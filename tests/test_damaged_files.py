"""Damaged files in RESULTS_DIR and CERTS_DIR fail closed, never with a traceback: a real server
process on each, which warns once and starts a new run (then exits 6: no client comes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters

from conftest import federation_env, free_address, run_cli
from flowerpot.launcher import Process, clean_env
from server.reporting.record import RoundRecord
from server.reporting.results import CHECKPOINT, HISTORY_LINES, Checkpoint, Results
from shared.errors import ExitCode
from shared.modelfile import to_npy, write_npz

# Every test here runs servers and clients (or the CLI) as processes.
pytestmark = pytest.mark.process

GOOD_META = {"format": 2, "run": {}, "round": 1, "finished": False, "parameters": 1, "strategy_state": {}}


def start_server(place: Path, **settings: str) -> Process:
    """The server on `place`'s results, waiting 1 s for clients that never come: its exit status is 6."""
    env = federation_env(place / "data", place, free_address(), START_TIMEOUT="1", **settings)
    server = Process("server", ["-m", "flowerpot", "server"], clean_env(**env), place)
    try:
        assert server.wait(120) == ExitCode.CLIENTS_TIMEOUT, server.output
    finally:
        server.stop()
    assert "Traceback" not in server.output, server.output
    return server


def write_checkpoint(place: Path, **changed: object) -> None:
    (place / "results").mkdir(parents=True, exist_ok=True)
    meta = {**GOOD_META, **changed}
    entries = {"param_0": to_npy(np.ones(3, np.float32)), "meta": to_npy(np.array(json.dumps(meta)))}
    write_npz(place / "results" / CHECKPOINT, entries)


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ({"round": "abc"}, "its round is 'abc', not a whole number from 1"),
        ({"run": "x"}, "its run is 'x', not a JSON object of settings"),
        ({"parameters": -1}, "its parameters is -1, not a count of arrays from 1"),
        ({"finished": "false"}, "its finished is 'false', not true or false"),
        ({"strategy_state": {"m_t": "2"}}, "its strategy_state is"),
    ],
)
def test_a_damaged_checkpoint_gives_one_warning_and_a_new_run(damage: dict, said: str, tmp_path: Path) -> None:
    write_checkpoint(tmp_path, **damage)
    server = start_server(tmp_path)
    assert said in server.output and "a new run starts and the earlier results move to previous/" in server.output
    assert server.output.count("cannot be read") == 1
    assert "waiting up to 1 s for MIN_AVAILABLE_CLIENTS" in server.output  # the new run went on


def test_a_torn_checkpoint_write_is_removed_at_the_next_start(tmp_path: Path) -> None:
    """A full disk stops the write of .checkpoint.npz.tmp halfway: the next start removes it."""
    results = tmp_path / "results"
    results.mkdir()
    torn = results / f".{CHECKPOINT}.tmp"
    torn.write_bytes(b"PK\x03\x04 half a zip")
    server = start_server(tmp_path)
    assert not torn.exists()
    assert f"removed {torn}, left by a write that did not finish" in server.output


def test_a_server_key_readable_by_others_is_warned_about(tmp_path: Path) -> None:
    made = run_cli(["certs", "--client", "site-a"], cwd=tmp_path, CERTS_DIR=str(tmp_path / "certs"))
    assert made.returncode == 0, made.stderr
    key = next((tmp_path / "certs").rglob("server.key"))
    key.chmod(0o644)
    server = start_server(tmp_path, TLS_ENABLED="true", CERTS_DIR=str(tmp_path / "certs"))
    assert f"{key} is readable by other users (mode 644)" in server.output and "chmod 600" in server.output
    key.chmod(0o600)
    assert "readable by other users" not in start_server(tmp_path, TLS_ENABLED="true",
                                                         CERTS_DIR=str(tmp_path / "certs")).output  # fmt: skip


def test_a_history_line_with_a_round_that_is_text_is_not_resumed(tmp_path: Path, caplog) -> None:
    """history.jsonl with "round": "1" next to a checkpoint of round 1: one warning, no resume."""
    results = Results(tmp_path)
    counts = ("clients_trained", "clients_failed", "updates_refused", "clients_evaluated", "eval_failures")
    nothing = {"train_loss": None, "train_accuracy": None, "eval_loss": None, "eval_accuracy": None}
    times = {"seconds": 0.0, "fit_seconds": 0.0, "started_at": 0.0, "bytes_sent": 0, "bytes_received": 0}
    rest = {"model_bytes": 0, "fit_metrics": {}, "eval_metrics": {}, "clients": []}
    line: dict[str, Any] = {"round": 1, **dict.fromkeys(counts, 0), **nothing, **times, **rest}
    assert RoundRecord.from_json(line).round == 1  # a whole record, but for the round's type below
    (tmp_path / HISTORY_LINES).write_text(json.dumps({**line, "round": "1"}) + "\n")
    checkpoint = Checkpoint({}, 1, False, ndarrays_to_parameters([np.ones(3, np.float32)]))
    assert results.resume_history(checkpoint) is None
    assert "line 1 is not a round record (its round is '1', not a whole number)" in caplog.text
