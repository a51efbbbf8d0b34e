"""Reproducible sampling: with FRACTION_FIT < 1 the same SEED trains the same shards every round,
in a rerun and in a run resumed after the server was killed."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
from flwr.server.superlink.fleet.grpc_bidi.grpc_bridge import GrpcBridge

from conftest import federation_env, free_address
from server.training.sampling import seeded_sample
from server.transport.admission import BoundedClientManager
from server.transport.wiring import NamedClientProxy
from shared.modelfile import load_model


def proxies(cids: list[str]) -> list[NamedClientProxy]:
    return [NamedClientProxy(cid=cid, bridge=GrpcBridge(), name=f"client-{i}") for i, cid in enumerate(cids)]


def names(sample: list[NamedClientProxy]) -> list[str]:
    return [p.name for p in sample]


def test_the_sample_depends_on_seed_and_round_not_on_client_ids_or_join_order() -> None:
    first = proxies([f"a{i}" for i in range(10)])
    again = list(reversed(proxies([f"z{i}" for i in range(10)])))  # other ids, joined in another order
    for server_round in range(1, 6):
        assert names(seeded_sample(first, 4, 42, server_round, "fit")) == names(
            seeded_sample(again, 4, 42, server_round, "fit")
        )
    rounds = {tuple(names(seeded_sample(first, 4, 42, r, "fit"))) for r in range(1, 11)}
    assert len(rounds) > 1  # not the same clients every round
    seeds = {tuple(names(seeded_sample(first, 4, s, 1, "fit"))) for s in range(10)}
    assert len(seeds) > 1


def test_the_client_manager_samples_for_the_round_the_strategy_names() -> None:
    manager = BoundedClientManager(wait_timeout=1, seed=7)
    for proxy in proxies([f"c{i}" for i in range(6)]):
        manager.register(proxy)
    manager.for_round(3, "fit")
    chosen = names(manager.sample(3))
    assert chosen == names(seeded_sample(list(manager.all().values()), 3, 7, 3, "fit"))
    assert names(manager.sample(3)) == chosen  # the same round: the same clients


def fit_shards(results: Path) -> list[list[str]]:
    """The shards that trained, per round, from the run's history."""
    history = json.loads((results / "history.json").read_text())
    return [sorted(str(c["metrics"]["shard"]) for c in r["clients"] if c["phase"] == "fit") for r in history]


def start_pinned(federation, env: dict[str, str]):
    """A server and three clients, client-N pinned to shard N-1 (name and shard go together)."""
    run = federation(env, 0)
    for shard in range(3):
        run.start_client(shard + 1, SHARD_ID=str(shard))
    return run


def test_same_seed_samples_the_same_shards_in_a_rerun_and_after_resume(
    spawn, federation, data_dir: Path, tmp_path: Path
) -> None:
    settings = {"FRACTION_FIT": "0.5", "NUM_ROUNDS": "6", "LOCAL_EPOCHS": "1", "CONNECT_TIMEOUT": "60"}
    calm = start_pinned(federation, federation_env(data_dir, tmp_path / "calm", free_address(), **settings))
    assert calm.server.wait(300) == 0, calm.server.output
    expected = fit_shards(tmp_path / "calm" / "results")
    assert [len(s) for s in expected] == [2] * 6  # max(int(3 * 0.5), MIN_FIT_CLIENTS=2) of 3
    calm_model, _ = load_model(tmp_path / "calm" / "results" / "final_model.npz")

    env = federation_env(data_dir, tmp_path, free_address(), **settings)
    # Each fit sleeps as long again as 30 fits (results unchanged): round 4 is still training when
    # the kill lands after round 3's line, so the run resumes at round 4 (a round takes 40 ms).
    interrupted = start_pinned(federation, {**env, "CLIENT_SLOWDOWN": "30"})
    interrupted.server.wait_for("round 3/6", timeout=240)
    interrupted.server.popen.send_signal(signal.SIGKILL)
    interrupted.server.wait()
    second = spawn(["server"], **env)
    assert second.wait(300) == 0, second.output
    assert "resuming the unfinished run at round 4 of 6" in second.output, second.output
    clients = "\n".join(c.output for c in interrupted.clients)
    # rounds 1-3: a rerun; 4-6: resumed
    assert fit_shards(tmp_path / "results") == expected, second.output + clients
    model, _ = load_model(tmp_path / "results" / "final_model.npz")
    assert all(np.array_equal(a, b) for a, b in zip(model, calm_model))
