"""Sync over-selection (FIT_QUORUM, ROUND_DEADLINE): real server and client processes on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import federation_env, free_address
from flowerpot.launcher import LocalFederation
from shared.modelfile import FINAL_MODEL, load_model


def run_with_a_straggler(data_dir: Path, tmp_path: Path, **settings: str) -> tuple[str, list[dict]]:
    """3 rounds of client-1, whose one fit outlasts the run (400 x its training's CPU time, about
    25 s: at 150 x a fit of little CPU once ended inside a 6 s ROUND_DEADLINE), and two clients
    of normal speed; every process must exit 0."""
    env = federation_env(
        data_dir, tmp_path, free_address(), NUM_ROUNDS="3", LOCAL_EPOCHS="1", MIN_FIT_CLIENTS="2",
        MIN_EVALUATE_CLIENTS="2", **settings,
    )  # fmt: skip
    with LocalFederation(env, cwd=tmp_path, address=env["SERVER_ADDRESS"]) as run:
        run.start_server()
        for slowdown in ("400", "3", "3"):
            run.start_client(CLIENT_SLOWDOWN=slowdown)
        assert run.wait(300) == 0, run.server.output
        assert all(c.returncode == 0 for c in run.clients), [c.output for c in run.clients]
    return run.server.output, json.loads((tmp_path / "results" / "history.json").read_text())


def fitted_by(record: dict) -> list[str]:
    return sorted(c["client"] for c in record["clients"] if c["phase"] == "fit")


def assert_every_client_keeps_the_final_model(results: Path) -> None:
    server_arrays, _ = load_model(results / FINAL_MODEL)
    kept = sorted(results.glob(f"client_shard_*/{FINAL_MODEL}"))
    assert len(kept) == 3, kept
    for path in kept:
        arrays, _ = load_model(path)
        assert all(np.array_equal(a, b) for a, b in zip(arrays, server_arrays, strict=True)), path


def test_a_round_aggregates_its_first_answers_and_counts_the_late_one(data_dir: Path, tmp_path: Path) -> None:
    output, rounds = run_with_a_straggler(data_dir, tmp_path, FIT_QUORUM="0.6")  # the first 2 of 3
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert fitted_by(rounds[0]) == ["client-2", "client-3"] and rounds[0]["updates_late"] == 1
    assert "round 1: did not wait for 1 late client(s) (FIT_QUORUM=0.6): client-1" in output
    # Still busy with round 1's fit, client-1 is not sampled again: later rounds have no late one.
    assert all(fitted_by(r) == ["client-2", "client-3"] and "updates_late" not in r for r in rounds[1:])
    header = (tmp_path / "results" / "history.csv").read_text().splitlines()[0]
    assert header.endswith(",updates_late")
    # client-1 gets the final model after the report, when its fit has ended.
    finished = output.index("finished 3 rounds")
    assert output.index("the final model went also to client-1", finished) > finished
    assert_every_client_keeps_the_final_model(tmp_path / "results")


def test_a_round_deadline_cuts_the_round_with_what_arrived(data_dir: Path, tmp_path: Path) -> None:
    output, rounds = run_with_a_straggler(data_dir, tmp_path, ROUND_DEADLINE="6")
    assert fitted_by(rounds[0]) == ["client-2", "client-3"] and rounds[0]["updates_late"] == 1
    assert "round 1: did not wait for 1 late client(s) (ROUND_DEADLINE): client-1" in output
    assert_every_client_keeps_the_final_model(tmp_path / "results")
