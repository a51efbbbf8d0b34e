"""The last round evaluates on every connected client whatever FRACTION_EVALUATE says: real
server and client processes on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import federation_env, free_address
from shared.modelfile import FINAL_MODEL, load_model


def test_without_evaluation_the_last_round_still_evaluates_on_every_client(
    spawn, data_dir: Path, tmp_path: Path
) -> None:
    env = federation_env(data_dir, tmp_path, free_address(), FRACTION_EVALUATE="0")
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    clients = [spawn(["client"], **env, CLIENT_NAME=f"client-{i}") for i in (1, 2, 3)]
    assert server.wait() == 0, server.output
    assert [c.wait() for c in clients] == [0, 0, 0], [c.output for c in clients]

    results = tmp_path / "results"
    rounds = json.loads((results / "history.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["clients_evaluated"] for r in rounds] == [0, 0, 3]
    assert [r["eval_accuracy"] is None for r in rounds] == [True, True, False]
    assert rounds[-1]["eval_accuracy"] >= 0.9
    assert "final accuracy None" not in server.output

    server_arrays, meta = load_model(results / FINAL_MODEL)
    assert meta["eval_accuracy"] == rounds[-1]["eval_accuracy"]
    kept = sorted(results.glob(f"client_shard_*/{FINAL_MODEL}"))
    assert [p.parent.name for p in kept] == ["client_shard_000", "client_shard_001", "client_shard_002"]
    for path in kept:
        arrays, _ = load_model(path)
        assert all(np.array_equal(a, b) for a, b in zip(arrays, server_arrays, strict=True))
