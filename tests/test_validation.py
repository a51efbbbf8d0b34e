"""The evaluation protocol: settings are tuned on a validation split held out of each shard's
training data (VALIDATION_FRACTION, EVALUATE_SPLIT=validation), never on the test splits that
are reported. Real processes: `flowerpot run-local`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.process

QUICK = {"NUM_ROUNDS": "1", "LOCAL_EPOCHS": "1", "METRICS_PORT": "0"}


def test_a_run_evaluates_on_the_validation_split_when_asked_and_says_when_there_is_none(tmp_path: Path) -> None:
    held = tmp_path / "held"
    held.mkdir()
    ran = run_cli(["run-local"], cwd=held, timeout=300, **QUICK, VALIDATION_FRACTION="0.1", EVALUATE_SPLIT="validation")
    assert ran.returncode == 0, ran.stderr[-3000:]
    sizes = {
        p.parent.name: json.loads(p.read_text())["validation"]
        for p in sorted((held / "data").glob("shard_*/shard.json"))
    }
    (last,) = json.loads((held / "results" / "history.json").read_text())
    evaluated = {c["shard"]: c["num_examples"] for c in last["clients"] if c["phase"] == "evaluate"}
    assert evaluated == sizes and all(0 < n < 100 for n in sizes.values())  # not the test splits (120 each)

    plain = tmp_path / "plain"
    plain.mkdir()
    assert run_cli(["prepare"], cwd=plain).returncode == 0  # no validation split
    # The clients read the same settings: they refuse at start, and run-local stops the waiting server.
    failed = run_cli(["run-local"], cwd=plain, timeout=300, **QUICK, EVALUATE_SPLIT="validation")
    assert failed.returncode == 2, failed.stderr[-3000:]  # the clients refuse at start (the same .env)
    assert "EVALUATE_SPLIT=validation: shard_00" in failed.stderr and "Traceback" not in failed.stderr
