"""Many logical clients in one process (CLIENTS_PER_PROCESS): real processes, real gRPC."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from test_tasks import CONTRACT, user_task

from bench.cross_device import threads
from client.claim import claim_free
from client.data.shards import shard_dirs
from conftest import free_address, run_cli
from flowerpot.launcher import descendants

pytestmark = pytest.mark.process

SHARDS = 20


@pytest.fixture(scope="module")
def twenty_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("twenty") / "data"
    result = run_cli(["prepare"], cwd=data.parent, DATA_DIR=str(data), NUM_SHARDS=str(SHARDS))
    assert result.returncode == 0, result.stderr
    return data


def fleet_env(data: Path, tmp_path: Path, **overrides: str) -> dict[str, str]:
    address = free_address()
    return {
        "DATA_DIR": str(data),
        "RESULTS_DIR": str(tmp_path / "results"),
        "SERVER_LISTEN_ADDRESS": address,
        "SERVER_ADDRESS": address,
        "NUM_SHARDS": str(SHARDS),
        "NUM_ROUNDS": "3",
        "LOCAL_EPOCHS": "1",
        "MAX_CLIENTS": str(SHARDS),
        "MIN_AVAILABLE_CLIENTS": str(SHARDS),
        "MIN_FIT_CLIENTS": "2",
        "MIN_EVALUATE_CLIENTS": "2",
        "FRACTION_FIT": "0.1",
        "FRACTION_EVALUATE": "0.1",
        "CLIENTS_PER_PROCESS": str(SHARDS // 2),
        "START_TIMEOUT": "60",
        "CONNECT_TIMEOUT": "30",
        "ROUND_TIMEOUT": "60",
        "METRICS_PORT": "0",
        **overrides,
    }


def history(tmp_path: Path) -> list[dict]:
    return json.loads((tmp_path / "results" / "history.json").read_text())


def test_two_processes_of_ten_logical_clients_federate_a_tenth_per_round(spawn, twenty_shards, tmp_path) -> None:
    env = fleet_env(twenty_shards, tmp_path)
    server = spawn(["server"], **env)
    server.wait_for("listening", timeout=30)
    clients = [spawn(["client"], **env) for _ in range(2)]
    assert server.wait(timeout=180) == 0, server.output[-3000:]
    for client in clients:
        assert client.wait(timeout=30) == 0, client.output[-3000:]
        assert "all 10 logical clients completed the run" in client.output
    records = history(tmp_path)
    assert [r["clients_trained"] for r in records] == [2, 2, 2]  # max(int(20 x 0.1), MIN_FIT_CLIENTS)
    assert {c["shard"] for r in records for c in r["clients"]} <= {f"shard_{i:03d}" for i in range(SHARDS)}
    assert records[-1]["clients_evaluated"] == SHARDS  # the last round, on every client
    evaluated = {c["shard"] for c in records[-1]["clients"] if c["phase"] == "evaluate"}
    assert evaluated == {f"shard_{i:03d}" for i in range(SHARDS)}
    # one copy of the final model per process, not one per logical client
    assert len(list((tmp_path / "results").glob("client_shard_*/final_model.npz"))) == 2
    # every logical client's lines from its own thread say whose they are
    claimed = [line for c in clients for line in c.output.splitlines() if " claimed shard_" in line]
    assert len(claimed) == SHARDS
    trained = [line for c in clients for line in c.output.splitlines() if ": trained on " in line]
    assert trained and all(re.search(r"client: shard_\d{3}: round \d: trained", line) for line in trained)


RAISES_ONCE_PER_PROCESS = CONTRACT.read_text().replace(
    "    opt = torch.optim.Adam",
    "    global RAISED\n"
    "    if not globals().get('RAISED'):\n"
    "        RAISED = True\n"
    '        raise RuntimeError("boom")\n'
    "    opt = torch.optim.Adam",
)


def test_one_logical_clients_training_raising_is_its_failed_fit_and_the_others_go_on(
    spawn, twenty_shards, tmp_path
) -> None:
    folder = user_task(tmp_path, text=RAISES_ONCE_PER_PROCESS)
    env = fleet_env(
        twenty_shards, tmp_path, TASK="my_task", TASK_DIR=str(folder), LEARNING_RATE="0.005",
        CLIENTS_PER_PROCESS=str(SHARDS), MIN_FIT_CLIENTS="4", FRACTION_FIT="0.2",
    )  # fmt: skip
    server = spawn(["server"], **env)
    server.wait_for("listening", timeout=30)
    client = spawn(["client"], **env)
    assert server.wait(timeout=180) == 0, server.output[-3000:]
    assert client.wait(timeout=30) == 0, client.output[-3000:]
    assert client.output.count("train raised RuntimeError: boom: the fit failed") == 1
    records = history(tmp_path)
    assert records[0]["clients_failed"] == 1 and records[0]["clients_trained"] == 3
    assert all(r["clients_failed"] == 0 and r["clients_trained"] == 4 for r in records[1:])
    assert "all 20 logical clients completed the run" in client.output and "Traceback" not in client.output


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("synthetic") / "data"
    made = run_cli(["prepare"], cwd=data.parent, DATA_DIR=str(data), DATASET="synthetic", NUM_SHARDS="250")
    assert made.returncode == 0, made.stderr
    return data


def test_250_idle_logical_clients_hold_no_thread_each_and_sigterm_stops_them_within_10_s(
    spawn, synthetic_shards, tmp_path
) -> None:
    """Threads: gRPC's synchronous client held three per logical client (758 for 250), each
    waking every 0.1 s while idle, which stalled a join storm of 10,000. SIGTERM frees every shard."""
    # The server waits for more clients than there are: the logical clients sit connected.
    many = 250
    env = fleet_env(
        synthetic_shards, tmp_path, DATASET="synthetic", NUM_SHARDS=str(many), MAX_CLIENTS="300",
        MIN_AVAILABLE_CLIENTS="300", START_TIMEOUT="300", CLIENTS_PER_PROCESS=str(many),
    )  # fmt: skip
    server = spawn(["server"], **env)
    server.wait_for("listening", timeout=30)
    client = spawn(["client"], **env)
    server.wait_for(rf"\({many} connected\)", timeout=120)
    assert not claim_free(shard_dirs(synthetic_shards), many)  # all held
    held = sum(threads(pid) for pid in (client.popen.pid, *descendants(client.popen.pid)))
    assert held < 40, f"{held} threads for {many} idle logical clients"
    started = time.monotonic()
    client.popen.terminate()
    code = client.wait(timeout=30)
    assert time.monotonic() - started < 10 and code == 143, client.output[-2000:]
    assert "Traceback" not in client.output
    claims = claim_free(shard_dirs(synthetic_shards), many)
    assert len(claims) == many  # every claim went with the process
    for claim in claims:
        claim.release()
    server.wait_for(r"\(0 connected\)", timeout=30)


def test_more_logical_clients_than_free_shards_start_those_they_can_and_say_so(spawn, twenty_shards, tmp_path) -> None:
    env = fleet_env(twenty_shards, tmp_path, MIN_AVAILABLE_CLIENTS=str(SHARDS), NUM_ROUNDS="1")
    server = spawn(["server"], **env)
    server.wait_for("listening", timeout=30)
    first = spawn(["client"], **{**env, "CLIENTS_PER_PROCESS": "15"})
    first.wait_for(r"starting 15 logical clients", timeout=60)
    second = spawn(["client"], **{**env, "CLIENTS_PER_PROCESS": "15"})
    second.wait_for(r"starting 5 of CLIENTS_PER_PROCESS=15 logical clients: only 5 of the 20 shards", timeout=60)
    assert server.wait(timeout=120) == 0, server.output[-3000:]
    assert first.wait(timeout=30) == 0 and second.wait(timeout=30) == 0, second.output[-3000:]
    third = run_cli(["client"], cwd=tmp_path, **{**env, "CLIENTS_PER_PROCESS": "15", "CONNECT_TIMEOUT": "1"})
    assert third.returncode != 3  # the shards are free again once the others stopped


@pytest.fixture(scope="module")
def thousand_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("thousand") / "data"
    made = run_cli(["prepare"], cwd=data.parent, DATA_DIR=str(data), DATASET="synthetic", NUM_SHARDS="1000",
                   SYNTHETIC_EXAMPLES="30000")  # fmt: skip
    assert made.returncode == 0, made.stderr
    return data


@pytest.mark.parametrize(
    "mode",
    [{}, {"MODE": "async", "CONCURRENCY": "100", "BUFFER_SIZE": "10", "NUM_ROUNDS": "30"}],
    ids=["sync", "async-fedbuff-regime"],
)
def test_a_thousand_logical_clients_in_four_processes_federate_a_tenth_per_round(
    spawn, thousand_shards, tmp_path, mode: dict[str, str]
) -> None:
    """The cross-device regime on one machine: 1,000 connected clients, 100 train per round
    (async: FedBuff's, 100 training at any time, 10 updates per version, 30 versions: the same
    300 updates as sync's 3 rounds). Five local epochs, so that 3 rounds learn above chance."""
    many = 1000
    env = fleet_env(
        thousand_shards, tmp_path, DATASET="synthetic", NUM_SHARDS=str(many), MAX_CLIENTS=str(many),
        MIN_AVAILABLE_CLIENTS=str(many), CLIENTS_PER_PROCESS="250", START_TIMEOUT="600", CONNECT_TIMEOUT="300",
        ROUND_TIMEOUT="300", LOCAL_EPOCHS="5", **mode,
    )  # fmt: skip
    server = spawn(["server"], **env)
    server.wait_for("listening", timeout=30)
    clients = [spawn(["client"], **env) for _ in range(4)]
    assert server.wait(timeout=900) == 0, server.output[-3000:]
    for client in clients:
        assert client.wait(timeout=60) == 0, client.output[-3000:]
        assert "all 250 logical clients completed the run" in client.output
    records = history(tmp_path)
    assert len(records) == int(env["NUM_ROUNDS"])
    assert all(r["clients_connected"] == many for r in records), [r["clients_connected"] for r in records]
    per_version = 10 if mode else 100  # BUFFER_SIZE, or FRACTION_FIT x 1,000
    assert all(r["clients_trained"] == per_version for r in records), [r["clients_trained"] for r in records]
    assert records[-1]["clients_evaluated"] == many  # the final evaluation, on every client
    assert records[-1]["eval_accuracy"] > 0.2, records[-1]["eval_accuracy"]  # 10 classes: chance is 0.1


def test_a_join_storm_of_4000_logical_clients_is_seated_without_a_cancelled_stream(spawn, tmp_path) -> None:
    """gRPC's core cancels streams queued beyond 1,000 (3,000 at most) waiting for a worker: 4
    processes of 1,000 logical clients saw 3,439 cancelled joins, each joined again at once."""
    many, each = 4000, 1000
    data = tmp_path / "data"
    made = run_cli(
        ["prepare"],
        cwd=tmp_path,
        DATA_DIR=str(data),
        DATASET="synthetic",
        NUM_SHARDS=str(many),
        SYNTHETIC_EXAMPLES="120000",
    )
    assert made.returncode == 0, made.stderr
    env = fleet_env(
        data, tmp_path, DATASET="synthetic", NUM_SHARDS=str(many), MAX_CLIENTS=str(many + 1),
        MIN_AVAILABLE_CLIENTS=str(many + 1), CLIENTS_PER_PROCESS=str(each), START_TIMEOUT="300",
    )  # fmt: skip
    server = spawn(["server"], **env)
    server.wait_for("listening", timeout=30)
    clients = [spawn(["client"], **env) for _ in range(many // each)]
    server.wait_for(rf"\({many} connected\)", timeout=240)
    for client in clients:
        assert "lost the connection" not in client.output, client.output[-2000:]
        assert "before its first instruction" not in client.output, client.output[-2000:]


def test_logical_clients_join_a_tls_server_under_their_process_certificate(spawn, twenty_shards, tmp_path) -> None:
    """Mutual TLS: every logical client of a process presents the process's one certificate, so
    MAX_CONNECTIONS_PER_CLIENT must hold CLIENTS_PER_PROCESS of them (docs/cross-device.md)."""
    made = run_cli(["certs", "--client", "site-a", "--client", "site-b"], cwd=tmp_path, CERTS_DIR="certs")
    assert made.returncode == 0, made.stderr
    env = fleet_env(twenty_shards, tmp_path, MAX_CONNECTIONS_PER_CLIENT=str(SHARDS // 2))
    env |= {
        "SERVER_ADDRESS": env["SERVER_ADDRESS"].replace("127.0.0.1", "localhost"),  # a name in the certificate
        "CERTS_DIR": str(tmp_path / "certs"),
        "TLS_ENABLED": "true",
        "CLIENT_AUTH": "certificate",
    }
    server = spawn(["server"], **env)
    server.wait_for("listening", timeout=30)
    assert "(TLS, client certificates required)" in server.output
    clients = [spawn(["client"], **env, CLIENT_NAME=name) for name in ("site-a", "site-b")]
    assert server.wait(timeout=180) == 0, server.output[-3000:]
    for client in clients:
        assert client.wait(timeout=30) == 0, client.output[-3000:]
    joined = [line for line in server.output.splitlines() if "(certificate, serial" in line and "joined" in line]
    assert [sum(f"client {name} (" in line for line in joined) for name in ("site-a", "site-b")] == [10, 10]
