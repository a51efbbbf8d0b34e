"""Secure aggregation in real runs: server and digits clients as processes over real gRPC."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from tests.conftest import BASE_ENV, free_address, run_cli

ENV = {**BASE_ENV, "MIN_FIT_CLIENTS": "3", "NUM_ROUNDS": "3", "SECAGG_STAGE_TIMEOUT": "10"}


def env_for(data: Path, results: Path, **values: str) -> dict[str, str]:
    address = free_address()
    return {**ENV, "DATA_DIR": str(data), "RESULTS_DIR": str(results), "SERVER_LISTEN_ADDRESS": address,
            "SERVER_ADDRESS": address, **values}  # fmt: skip


def run(spawn, env: dict[str, str]) -> tuple[str, list[dict]]:
    server = spawn(["server"], **env)
    server.wait_for("listening", timeout=30)
    clients = [spawn(["client"], **env) for _ in range(3)]
    assert server.wait(timeout=300) == 0, server.output[-3000:]
    for proc in clients:
        assert proc.wait(timeout=60) == 0, proc.output[-2000:]
    return server.output, json.loads((Path(env["RESULTS_DIR"]) / "history.json").read_text())


def test_a_secure_run_learns_as_plain_fedavg_does(spawn, digits_shards, tmp_path) -> None:
    """Same seeds, same shards: the aggregate differs only by quantization."""
    _, plain = run(spawn, env_for(digits_shards, tmp_path / "plain"))
    output, secure = run(spawn, env_for(digits_shards, tmp_path / "secure", SECURE_AGGREGATION="true"))
    assert output.count("secure aggregation of 3 sampled: 3 advertised keys, 3 shared them, 3 sent inputs") == 3
    assert [r["clients_trained"] for r in secure] == [3, 3, 3]
    assert abs(secure[-1]["eval_accuracy"] - plain[-1]["eval_accuracy"]) <= 0.02, (secure[-1], plain[-1])
    assert abs(secure[0]["eval_loss"] - plain[0]["eval_loss"]) < 0.01 * plain[0]["eval_loss"]


def test_a_client_killed_mid_round_is_a_dropout_and_sigterm_stops_a_secure_round(spawn, digits_shards, tmp_path):
    data = tmp_path / "data4"
    made = run_cli(["prepare"], cwd=tmp_path, DATA_DIR=str(data), NUM_SHARDS="4")
    assert made.returncode == 0, made.stderr
    # 4 sampled, threshold 0.6: 3 shares rebuild a secret, so one client may drop out
    env = env_for(
        data, tmp_path / "r", SECURE_AGGREGATION="true", NUM_ROUNDS="2", NUM_SHARDS="4", MIN_AVAILABLE_CLIENTS="4"
    )
    server = spawn(["server"], **env)
    server.wait_for("listening", timeout=30)
    clients = [spawn(["client"], **env) for _ in range(3)]
    slow = spawn(["client"], **env, CLIENT_SLOWDOWN="40")  # its fits take seconds: time to kill it in one
    server.wait_for("round 1/2:", timeout=120)
    time.sleep(1.0)  # round 2's keys are shared in milliseconds; its training takes seconds
    slow.popen.send_signal(signal.SIGKILL)
    assert server.wait(timeout=120) == 0, server.output[-3000:]
    assert "left at masked_input" in server.output, server.output[-3000:]
    assert "round 2/2: 3 trained, 1 failed" in server.output, server.output[-3000:]
    for proc in clients:
        assert proc.wait(timeout=60) == 0

    # SIGTERM while a secure round waits for a slow client's masked input: the server stops at once
    env = env_for(digits_shards, tmp_path / "t", SECURE_AGGREGATION="true")
    server = spawn(["server"], **env)
    server.wait_for("listening", timeout=30)
    others = [spawn(["client"], **env) for _ in range(2)] + [spawn(["client"], **env, CLIENT_SLOWDOWN="500")]
    server.wait_for("starting 3 rounds", timeout=120)
    time.sleep(1.0)
    stopped = time.monotonic()
    server.popen.send_signal(signal.SIGTERM)
    server.wait(timeout=30)
    assert time.monotonic() - stopped < 10, server.output[-2000:]
    for proc in others:
        proc.popen.send_signal(signal.SIGTERM)


def test_signed_keys_under_mutual_tls_with_logical_clients_and_a_server_optimizer(spawn, digits_shards, tmp_path):
    """Three logical clients in one process share a client certificate, sign their keys with it
    and check each other's; FedAdam steps along the unmasked sum."""
    made = run_cli(["certs", "--client", "site-a"], cwd=tmp_path, CERTS_DIR="certs")
    assert made.returncode == 0, made.stderr
    env = env_for(
        digits_shards, tmp_path / "results", SECURE_AGGREGATION="true", STRATEGY="fedadam", NUM_ROUNDS="2",
        TLS_ENABLED="true", CLIENT_AUTH="certificate", CERTS_DIR=str(tmp_path / "certs"), CLIENT_NAME="site-a",
    )  # fmt: skip
    env["SERVER_ADDRESS"] = env["SERVER_ADDRESS"].replace("127.0.0.1", "localhost")  # a name in its certificate
    server = spawn(["server"], **env)
    server.wait_for("listening", timeout=30)
    fleet = spawn(["client"], **env, CLIENTS_PER_PROCESS="3")
    assert server.wait(timeout=300) == 0, server.output[-3000:]
    assert fleet.wait(timeout=60) == 0, fleet.output[-3000:]
    assert server.output.count("3 advertised keys, 3 shared them, 3 sent inputs") == 2, server.output[-3000:]
    assert "not signed" not in fleet.output and "refused" not in fleet.output, fleet.output[-3000:]
    history = json.loads((tmp_path / "results" / "history.json").read_text())
    assert history[-1]["eval_accuracy"] > history[0]["eval_accuracy"] - 0.05 and not history[-1].get("failed")
