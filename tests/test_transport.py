"""The transport under attack and under stress, with real processes and real gRPC on loopback:
cancelled joins leave nothing behind, a vanished peer frees its place, every phase of a run
stops on SIGTERM within 10 s, and oversized updates are refused unread."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from flwr.proto.transport_pb2_grpc import FlowerServiceStub

from conftest import federation_env, free_address
from flowerpot.launcher import Process, clean_env
from shared.protocol import CLIENT_NAME_KEY

STOP_BOUND = 10.0  # seconds: SIGTERM stops the server within this, in every phase


def cancelled_joins(address: str, count: int, threads: int = 4, seconds: float = 90) -> int:
    """Open `count` Join streams and cancel each within a few milliseconds, as an attacker
    would; the number actually opened (bounded by `seconds`)."""
    deadline = time.monotonic() + seconds
    opened = [0] * threads

    def storm(worker: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = FlowerServiceStub(channel)
            for i in range(count // threads):
                if time.monotonic() > deadline:
                    return
                call = stub.Join(iter(queue.Queue().get, None), metadata=((CLIENT_NAME_KEY, f"ghost-{i}"),))
                time.sleep((i % 4) * 0.001)  # 0-3 ms: before, during and after the server's handler starts
                call.cancel()
                opened[worker] += 1

    workers = [threading.Thread(target=storm, args=(w,)) for w in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(opened)


def connected_count(server: Process) -> int:
    """The server's latest count of connected clients, from its join/leave log lines."""
    counts = re.findall(r"\((\d+) connected\)", server.output)
    return int(counts[-1]) if counts else 0


def test_a_storm_of_cancelled_joins_leaves_no_ghosts(spawn, data_dir: Path, tmp_path: Path) -> None:
    """MAX_CLIENTS=3: a single place held by a ghost would refuse a real client, and a ghost in
    the client manager would make the run wait on a client that does not exist. (A stream that is
    still open when the server handles it joins for those milliseconds and leaves again: that is
    not a ghost.)"""
    address = free_address()
    env = federation_env(data_dir, tmp_path, address, MAX_CLIENTS="3", ROUND_TIMEOUT="20", NUM_ROUNDS="2")
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    opened = cancelled_joins(address, 1200)
    assert opened >= 600
    time.sleep(2)  # the last cancellations reach the server
    assert connected_count(server) == 0, server.output[-3000:]
    clients = [spawn(["client"], **env, CLIENT_NAME=f"client-{i}") for i in (1, 2, 3)]
    assert server.wait(180) == 0, server.output[-5000:]
    assert [c.wait(60) for c in clients] == [0, 0, 0]
    assert "refused client client-" not in server.output
    assert "(3 clients) |" in server.output.rsplit("round 2/2", 1)[-1]  # all three evaluated the final model
    assert connected_count(server) == 0


# A plain Flower NumPyClient (no Flowerpot code) that misbehaves on purpose: it sleeps forever in
# HANG (get_parameters, fit or evaluate), or sends an update of BIG_MB MiB instead of the model.
RAW_CLIENT = """
import sys, time
import numpy as np
from flwr.compat.client.app import start_client
from flwr.compat.client.numpy_client import NumPyClient

address, hang, big_mb = sys.argv[1], sys.argv[2], float(sys.argv[3])
model = [a for a in np.load(sys.argv[4]).values()] if len(sys.argv) > 4 else [np.zeros((8, 8), np.float32)]

def maybe_hang(phase):
    if phase == hang:
        print(f"hanging in {phase}", flush=True)
        time.sleep(3600)

class Raw(NumPyClient):
    def get_parameters(self, config):
        maybe_hang("get_parameters")
        return model
    def fit(self, parameters, config):
        maybe_hang("fit")
        if big_mb:
            print("sending a big update", flush=True)
            return [np.ones(int(big_mb * 2**18), np.float32)], 10, {}
        return parameters, 10, {}
    def evaluate(self, parameters, config):
        maybe_hang("evaluate")
        return 1.0, 10, {"accuracy": 0.5}

start_client(server_address=address, client=Raw().to_client(), grpc_max_message_length=2**30)
"""


def raw_client(tmp_path: Path, address: str, hang: str = "", big_mb: float = 0, model: Path | None = None) -> Process:
    script = tmp_path / "raw_client.py"
    script.write_text(textwrap.dedent(RAW_CLIENT))
    args = [str(script), address, hang or "-", str(big_mb), *([str(model)] if model else [])]
    return Process("raw", args, clean_env(), tmp_path)


def stop_within_bound(server: Process) -> float:
    started = time.monotonic()
    server.popen.send_signal(signal.SIGTERM)
    try:
        server.popen.wait(timeout=STOP_BOUND + 20)
    except subprocess.TimeoutExpired:
        server.kill()
        raise AssertionError(f"the server ignored SIGTERM:\n{server.output[-3000:]}") from None
    return time.monotonic() - started


ONE_CLIENT = {"MIN_AVAILABLE_CLIENTS": "1", "MIN_FIT_CLIENTS": "1", "MIN_EVALUATE_CLIENTS": "1"}


@pytest.mark.parametrize("phase", ["waiting", "get_parameters", "fit", "evaluate", "results", "async fit"])
def test_sigterm_stops_the_server_within_10_s_in_every_phase(spawn, data_dir: Path, tmp_path: Path, phase: str) -> None:
    """A client that never answers holds the server in one phase; ROUND_TIMEOUT is long, so only
    the stop can end the wait. `results`: SIGTERM as the last round ends and its files are written.
    `async fit`: MODE=async, the client hangs in its fit."""
    address = free_address()
    rounds = "1" if phase == "results" else "3"
    mode = {"MODE": "async"} if phase.startswith("async") else {}
    phase = phase.removeprefix("async ")
    env = federation_env(data_dir, tmp_path, address, **ONE_CLIENT, ROUND_TIMEOUT="600", NUM_ROUNDS=rounds, **mode)
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    raw = None
    try:
        if phase == "waiting":
            server.wait_for("waiting up to")
        elif phase == "results":
            raw = raw_client(tmp_path, address)
            server.wait_for("round 1/1", timeout=120)
        else:
            raw = raw_client(tmp_path, address, hang=phase)
            raw.wait_for(f"hanging in {phase}", timeout=120)
        seconds = stop_within_bound(server)
    finally:
        if raw is not None:
            raw.kill()
    assert seconds < STOP_BOUND, f"{phase}: {seconds:.1f} s\n{server.output[-3000:]}"
    assert server.returncode in (0, 128 + signal.SIGTERM), server.output[-3000:]
    assert "Traceback" not in server.output, server.output[-3000:]


def test_a_client_that_vanished_silently_frees_its_place_within_the_keepalive_bound(
    spawn, data_dir: Path, tmp_path: Path
) -> None:
    """SIGSTOP keeps the client's TCP connection open but answers nothing, like a machine that
    lost power behind a NAT: keepalive must notice within 2 x KEEPALIVE_SECONDS."""
    keepalive = 5
    address = free_address()
    env = federation_env(data_dir, tmp_path, address, KEEPALIVE_SECONDS=str(keepalive))
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    client = spawn(["client"], **env, CLIENT_NAME="sleeper")
    server.wait_for(r"client sleeper .* joined \(1 connected\)")
    client.popen.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        server.wait_for(r"client sleeper .* left \(0 connected\)", timeout=2 * keepalive + 30)
        seconds = time.monotonic() - stopped
    finally:
        client.popen.send_signal(signal.SIGKILL)
    assert seconds < 2 * keepalive + 10, f"{seconds:.1f} s"


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


def test_an_oversized_update_is_refused_unread_and_the_run_goes_on(spawn, data_dir: Path, tmp_path: Path) -> None:
    """A plain Flower client answers fit with 12 MiB (under MAX_MESSAGE_MB, 60x the digits model)."""
    from client.data.shards import load_shard
    from client.tasks import get_weights, load_task

    spec = load_shard(data_dir / "shard_000").spec
    np.savez(tmp_path / "start.npz", *get_weights(load_task().new_model(spec, seed=42)))
    address = free_address()
    env = federation_env(data_dir, tmp_path, address, NUM_ROUNDS="3", MIN_FIT_CLIENTS="2")
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    before = rss_mib(server.pid)
    honest = [spawn(["client"], **env, CLIENT_NAME=f"honest-{i}") for i in (1, 2)]
    attacker = raw_client(tmp_path, address, big_mb=12, model=tmp_path / "start.npz")
    try:
        server.wait_for("round 2/3", timeout=120)
        peak = rss_mib(server.pid, "VmHWM")
        assert server.wait(120) == 0, server.output[-5000:]
    finally:
        attacker.kill()
    assert re.search(r"refused a message from client \S+ .*: a message of 12\.0 MiB is far larger", server.output)
    assert "round 1/3: 2 trained, 1 failed" in server.output, server.output[-5000:]
    assert [c.wait(60) for c in honest] == [0, 0]
    assert peak - before < 150, f"server RSS grew from {before:.0f} to {peak:.0f} MiB"


def test_the_default_max_message_fits_every_shipped_model_with_headroom() -> None:
    """Every built-in data set's CNN (and a folder data set at the default IMAGE_SIZE) fits the
    default MAX_MESSAGE_MB with its update margin; the default is not absurdly larger either."""
    from flwr.common import ndarrays_to_parameters

    from client.data.images import ImageSpec
    from client.tasks import get_weights, load_task
    from server.transport.wiring import METADATA_BYTES, UPDATE_SIZE_FACTOR
    from shared.settings import Settings

    ten = tuple("0123456789")
    specs = [
        ImageSpec("digits", 1, 8, 8, ten, (0.3,), (0.4,)),
        ImageSpec("mnist", 1, 28, 28, ten, (0.1,), (0.3,)),
        ImageSpec("fashion-mnist", 1, 28, 28, ten, (0.3,), (0.35,)),
        ImageSpec("cifar10", 3, 32, 32, ten, (0.5,) * 3, (0.25,) * 3),
        ImageSpec("folder", 3, 32, 32, tuple(f"c{i}" for i in range(100)), (0.5,) * 3, (0.25,) * 3),
    ]
    limit = Settings.model_fields["max_message_mb"].default * 2**20
    largest = 0
    for spec in specs:
        model_bytes = sum(
            len(t) for t in ndarrays_to_parameters(get_weights(load_task().new_model(spec, seed=0))).tensors
        )
        largest = max(largest, model_bytes)
        assert UPDATE_SIZE_FACTOR * model_bytes + METADATA_BYTES <= limit, spec.dataset
    assert limit <= 16 * largest  # ample headroom, but not 512 MiB for a 2 MiB model


@pytest.mark.unit
def test_handshake_reports_are_bounded_per_minute(caplog: pytest.LogCaptureFixture) -> None:
    """A flood of bad handshakes must not flood the server's log: 20 lines a minute, then a count."""
    from server.transport.handshake_log import LINES_PER_MINUTE, HandshakeReports

    reports = HandshakeReports()
    with caplog.at_level("WARNING", logger="flowerpot.server"):
        for _ in range(LINES_PER_MINUTE + 5):
            reports.report("SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED")
        reports.window -= 60  # a minute later
        reports.report("SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED")
    lines = [r.getMessage() for r in caplog.records]
    assert sum("a TLS handshake failed" in line for line in lines) == LINES_PER_MINUTE + 1
    assert "5 more TLS handshakes failed in the last minute" in lines[LINES_PER_MINUTE]
