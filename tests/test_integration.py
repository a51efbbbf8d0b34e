"""The federation as real processes talking real gRPC on loopback."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.compose import committed_env
from conftest import BASE_ENV, PLAIN_CLIENT, federation_env, free_address, run_cli
from flowerpot.launcher import clean_env
from shared.modelfile import load_model


def history(tmp_path: Path) -> list[dict]:
    return json.loads((tmp_path / "results" / "history.json").read_text())


def test_three_clients_train_and_predict_agrees_with_the_server(
    spawn, federation, data_dir: Path, tmp_path: Path
) -> None:
    env = federation_env(data_dir, tmp_path, free_address())
    run = federation(env, 3)
    server, clients = run.server, run.clients
    assert server.wait() == 0, server.output
    assert [c.wait() for c in clients] == [0, 0, 0], [c.output for c in clients]

    results = tmp_path / "results"
    for name in (
        "final_model.npz",
        "final_model.json",
        "global_model.npz",
        "history.json",
        "history.csv",
        "history.png",
    ):
        assert (results / name).is_file(), name
    rounds = history(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["clients_trained"] == 3 and r["clients_failed"] == 0 for r in rounds)
    assert len(server.output.split("round 3/3: 3 trained, 0 failed")) == 2
    final = rounds[-1]
    assert final["clients_evaluated"] == 3 and final["eval_accuracy"] >= 0.9
    claimed = sorted(c.wait_for(r"claimed (shard_\d+)").group(1) for c in clients)
    assert claimed == ["shard_000", "shard_001", "shard_002"]

    # predict with the final model over all shards' test splits = the server's federated accuracy
    report = run_cli(["predict", "--test-split", "--json", "--show", "0"], cwd=tmp_path, **env)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["accuracy"] == pytest.approx(final["eval_accuracy"], abs=1e-12)
    assert json.loads(report.stdout)["examples"] == sum(
        c["num_examples"] for c in final["clients"] if c["phase"] == "evaluate"
    )

    # a photo-like PNG of a test digit (big, dark ink on white) is classified like the original
    from PIL import Image

    from client.data.shards import load_shard

    verdicts = json.loads(run_cli(["predict", "--test-split", "--json", "--show", "50"], cwd=tmp_path, **env).stdout)
    sure = next(p for p in verdicts["predictions"] if p["label"] == p["true"] and p["confidence"] > 0.95)
    digit = load_shard(data_dir / sure["shard"]).x_test[sure["index"], 0]
    Image.fromarray(255 - digit).resize((64, 64), Image.Resampling.NEAREST).save(tmp_path / "digit.png")
    by_file = run_cli(["predict", "--json", str(tmp_path / "digit.png")], cwd=tmp_path, **env)
    assert by_file.returncode == 0, by_file.stderr
    assert json.loads(by_file.stdout)[0]["label"] == sure["true"]

    # every client kept the same final global model as the server wrote
    server_arrays, meta = load_model(results / "final_model.npz")
    assert meta["round"] == 3 and meta["eval_accuracy"] == final["eval_accuracy"]
    for shard in claimed:
        kept, kept_meta = load_model(results / f"client_{shard}" / "final_model.npz")
        assert all(np.array_equal(a, b) for a, b in zip(kept, server_arrays))
        assert kept_meta["spec"]["dataset"] == "digits"


@pytest.mark.process
def test_default_settings_reach_095_accuracy_locally(tmp_path: Path) -> None:
    """The committed .env (3 clients, digits, 5 rounds) as `flowerpot run-local` runs it."""
    (tmp_path / ".env").write_text(committed_env())  # not the working copy, which a user tunes
    started = time.monotonic()
    # Its METRICS_PORT is fixed: off here, so that runs side by side on one machine never collide.
    result = run_cli(["run-local"], cwd=tmp_path, timeout=180, METRICS_PORT="0")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = history(tmp_path)
    assert len(rounds) == 5 and rounds[-1]["clients_evaluated"] == 3
    assert rounds[-1]["eval_accuracy"] >= 0.95
    print(f"default local run: {elapsed:.1f} s, final accuracy {rounds[-1]['eval_accuracy']:.4f}")


def test_client_beyond_max_clients_is_refused_with_the_reason(
    spawn, federation, data_dir: Path, tmp_path: Path
) -> None:
    env = federation_env(
        data_dir, tmp_path, free_address(), MAX_CLIENTS="2", MIN_AVAILABLE_CLIENTS="2",
        NUM_ROUNDS="8", LOCAL_EPOCHS="25",
    )  # fmt: skip
    run = federation(env, 2)
    server, clients = run.server, run.clients
    server.wait_for(r"\(2 connected\)")
    extra = spawn(["client"], **env, CLIENT_NAME="latecomer")
    assert extra.wait(60) == 4
    assert "error: the server at" in extra.output
    assert "refused this client: the server is full: MAX_CLIENTS=2 clients are connected" in extra.output
    assert "Traceback" not in extra.output
    assert server.wait() == 0
    assert "refused client latecomer" in server.output
    assert [c.wait() for c in clients] == [0, 0]


def test_client_started_before_the_server_joins_when_it_is_up(spawn, data_dir: Path, tmp_path: Path) -> None:
    env = federation_env(
        data_dir, tmp_path, free_address(), MIN_AVAILABLE_CLIENTS="1", MIN_FIT_CLIENTS="1",
        MIN_EVALUATE_CLIENTS="1", NUM_ROUNDS="2",
    )  # fmt: skip
    client = spawn(["client"], **env)
    client.wait_for("not reachable yet")
    time.sleep(4)  # longer than Flower's own client waits before giving up
    assert client.popen.poll() is None
    server = spawn(["server"], **env)
    assert server.wait() == 0, server.output
    assert client.wait() == 0, client.output
    assert len(history(tmp_path)) == 2


def test_server_gives_up_when_too_few_clients_come(spawn, tmp_path: Path, data_dir: Path) -> None:
    env = federation_env(data_dir, tmp_path, free_address(), START_TIMEOUT="2")
    server = spawn(["server"], **env)
    assert server.wait(30) == 6
    assert (
        "flowerpot server: error: only 0 of MIN_AVAILABLE_CLIENTS=3 clients connected within START_TIMEOUT=2 s: "
        "start more clients, or lower MIN_AVAILABLE_CLIENTS"
    ) in server.output


def test_server_stops_waiting_when_clients_do_not_come_back(spawn, federation, tmp_path: Path, data_dir: Path) -> None:
    env = federation_env(
        data_dir, tmp_path, free_address(), MIN_AVAILABLE_CLIENTS="2", NUM_ROUNDS="50",
        REJOIN_TIMEOUT="3", LOCAL_EPOCHS="5",
    )  # fmt: skip
    run = federation(env, 2)
    server, (_first, second) = run.server, run.clients
    server.wait_for("round 2/50")
    second.popen.send_signal(signal.SIGKILL)
    assert server.wait(60) == 6
    assert "were connected within REJOIN_TIMEOUT=3 s" in server.output
    assert (tmp_path / "results" / "global_model.npz").is_file()  # rounds already played are kept


def test_client_without_a_server_gives_up_after_connect_timeout(spawn, tmp_path: Path, data_dir: Path) -> None:
    env = federation_env(data_dir, tmp_path, free_address(), CONNECT_TIMEOUT="2")
    client = spawn(["client"], **env)
    assert client.wait(30) == 5
    assert "was not reachable within CONNECT_TIMEOUT=2 s (connection refused)" in client.output


def test_client_with_no_free_shard_exits_3(spawn, tmp_path: Path, data_dir: Path) -> None:
    from client.claim import claim_shard

    env = federation_env(data_dir, tmp_path, free_address())
    with claim_shard(data_dir), claim_shard(data_dir), claim_shard(data_dir):
        client = spawn(["client"], **env)
        assert client.wait(30) == 3
    assert "error: all 3 shards in DATA_DIR=" in client.output


@pytest.mark.parametrize("strategy", ["fedadam", "fedprox", "fedavgm"])
def test_strategies_that_need_starting_weights_run_end_to_end(tmp_path: Path, data_dir: Path, strategy: str) -> None:
    env = {
        **BASE_ENV,
        "DATA_DIR": str(data_dir),
        "NUM_ROUNDS": "2",
        "STRATEGY": strategy,
        "SERVER_LEARNING_RATE": "0.01",
    }
    if strategy == "fedavgm":
        env["SERVER_LEARNING_RATE"] = "1.0"
    result = run_cli(["run-local"], cwd=tmp_path, timeout=120, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = history(tmp_path)
    assert len(rounds) == 2 and all(r["clients_trained"] == 3 for r in rounds)
    assert f"starting 2 rounds of {strategy}" in result.stderr
    if strategy == "fedprox":  # the proximal term reaches the history on its own, not inside train_loss
        assert all(r["fit_metrics"]["train_proximal_term"] > 0 for r in rounds[1:])


def test_a_plain_flower_numpy_client_can_join(spawn, tmp_path: Path) -> None:
    address = free_address()
    env = {
        **BASE_ENV, "RESULTS_DIR": str(tmp_path / "results"), "SERVER_LISTEN_ADDRESS": address,
        "MIN_AVAILABLE_CLIENTS": "1", "MIN_FIT_CLIENTS": "1", "MIN_EVALUATE_CLIENTS": "1", "NUM_ROUNDS": "2",
    }  # fmt: skip
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    import subprocess

    plain = subprocess.run(
        [sys.executable, str(PLAIN_CLIENT), address, "--odd-metrics"],
        env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert server.wait() == 0, server.output
    rounds = history(tmp_path)
    assert rounds[-1]["eval_accuracy"] == 0.5
    fit_metrics = [c["metrics"] for r in rounds for c in r["clients"] if c["phase"] == "fit"]
    assert fit_metrics[0] == {}  # metrics the server does not know are dropped, with one warning
    assert server.output.count("dropped metrics of client") == 1
    assert "favourite_colour" in server.output
    assert "initial parameters from the only client" in server.output  # unverified: said so
    model, _ = load_model(tmp_path / "results" / "final_model.npz")
    assert model[0] == pytest.approx(np.full((4, 3), 0.25))


def test_local_baseline_reports_each_sites_local_only_model_beside_the_global_one(
    federation, data_dir: Path, tmp_path: Path
) -> None:
    """The personalisation view: under 2-label shards the local models scored 0.991 on their own
    data against FedAvg's 0.843, and a user saw only the federated number. LOCAL_BASELINE=true
    makes each client train a model on its own shard alone at the end and report it."""
    env = federation_env(data_dir, tmp_path, free_address(), NUM_ROUNDS="2", LOCAL_BASELINE="true")
    run = federation(env, 3)
    assert run.server.wait() == 0, run.server.output
    assert [c.wait() for c in run.clients] == [0, 0, 0], [c.output for c in run.clients]
    final = history(tmp_path)[-1]
    local = final["eval_metrics"]["local_accuracy"]
    assert 0.5 < local <= 1.0
    assert f"against each site's local-only model {local:.4f}" in run.server.output
    evaluations = [c for c in final["clients"] if c["phase"] == "evaluate"]
    assert len(evaluations) == 3 and all(0 <= c["metrics"]["local_accuracy"] <= 1 for c in evaluations)
    assert all("local-only model (" in c.output for c in run.clients)  # NUM_ROUNDS x LOCAL_EPOCHS epochs
    assert "local_accuracy" not in history(tmp_path)[0]["eval_metrics"]  # only at the end
