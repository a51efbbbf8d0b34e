"""Warm clients (bench.warm.WarmPopen): real, separate processes forked from a forkserver that has
imported torch and Flower once; they must behave as plain clients do towards a normal server and
the launcher (output, exit status, stop), and the forkserver must be safe to fork."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from bench.warm import WarmPopen
from conftest import federation_env, free_address
from flowerpot.launcher import STOP_SECONDS, LocalFederation, Process, clean_env


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def waiting_env(tmp_path: Path) -> dict[str, str]:
    """A client that waits (up to a minute) for shards that never come."""
    return clean_env(SERVER_ADDRESS=free_address(), DATA_DIR=tmp_path / "none", SHARDS_TIMEOUT=60)


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_warm_clients_complete_a_run_with_a_plain_server(data_dir: Path, tmp_path: Path) -> None:
    env = federation_env(data_dir, tmp_path, free_address(), MIN_FIT_CLIENTS="3", MIN_EVALUATE_CLIENTS="3")
    with LocalFederation(env, cwd=tmp_path, address=env["SERVER_ADDRESS"], popen=WarmPopen) as federation:
        federation.start(3)
        assert not isinstance(federation.server.popen, WarmPopen)
        assert all(isinstance(c.popen, WarmPopen) for c in federation.clients)
        code = federation.wait(timeout=120)
        assert code == 0, federation.server.output
        assert federation.client_codes == [0, 0, 0], [c.output for c in federation.clients]
    history = json.loads((tmp_path / "results" / "history.json").read_text())
    assert len(history) == 3 and history[-1]["eval_accuracy"] > 0.5
    for client in federation.clients:
        # each its own process under the forkserver, not under this one, and its log captured
        assert client.pid != os.getpid() and "claimed shard_" in client.output and "round 3" in client.output


def test_a_warm_client_is_stopped_by_sigterm_and_its_output_is_kept(tmp_path: Path) -> None:
    client = Process(
        "client-1",
        ["-m", "flowerpot", "client"],
        waiting_env(tmp_path),
        tmp_path,
        popen=WarmPopen,
        log_file=tmp_path / "c.log",
    )
    try:
        client.wait_for("SHARDS_TIMEOUT", timeout=30)  # it waits for shards that never come
        assert client.returncode is None
        started = time.monotonic()
        client.stop()
        assert time.monotonic() - started < STOP_SECONDS  # it left on SIGTERM, no SIGKILL needed
        assert client.returncode == 128 + signal.SIGTERM  # flowerpot's own SIGTERM exit, as a plain client's
        assert client.output and (tmp_path / "c.log").read_text() == client.output
    finally:
        client.kill()


def test_a_warm_process_reports_its_exit_status_and_error_output(tmp_path: Path) -> None:
    bad = Process("attacker", ["-m", "bench.attacker", "--attack", "nope"], clean_env(), tmp_path, popen=WarmPopen)
    assert bad.wait(timeout=60) == 2
    assert "invalid choice: 'nope'" in bad.output and "RuntimeWarning" not in bad.output
    killed = Process("client", ["-m", "flowerpot", "client"], clean_env(DATA_DIR=tmp_path), tmp_path, popen=WarmPopen)
    killed.kill()
    assert killed.wait(timeout=10) == -signal.SIGKILL


def test_only_module_commands_start_warm(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must start with -m MODULE"):
        Process("script", ["tests/plain_client.py"], clean_env(), tmp_path, popen=WarmPopen)


def test_the_forkserver_is_preloaded_and_runs_one_thread(tmp_path: Path) -> None:
    """Fork safety: the parent the clients are forked from holds no threads (OpenBLAS's worker,
    started by importing numpy, is stopped by OpenBLAS before every fork) and no gRPC channel."""
    child = Process("client", ["-m", "flowerpot", "client"], waiting_env(tmp_path), tmp_path, popen=WarmPopen)
    try:
        child.wait_for("SHARDS_TIMEOUT", timeout=30)
        forkserver = parent_of(child.pid)
        assert forkserver != os.getpid()
        with open(f"/proc/{forkserver}/maps") as fh:
            maps = fh.read()
        assert "libtorch_cpu" in maps and "cygrpc" in maps  # torch and gRPC are imported there
        assert threads_of(forkserver) == 1
        sockets = [os.readlink(f"/proc/{forkserver}/fd/{fd}") for fd in os.listdir(f"/proc/{forkserver}/fd")]
        # its listener, alive pipe and the like; no TCP connection (a gRPC channel) anywhere
        with open(f"/proc/{forkserver}/net/tcp") as fh:
            inodes = {line.split()[9] for line in fh.readlines()[1:]}
        assert not any(s.startswith("socket:[") and s[8:-1] in inodes for s in sockets)
    finally:
        child.stop()
