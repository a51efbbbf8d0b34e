"""Clients that start before their machine's prepare step (Docker Swarm has no depends_on) wait
for the shards, up to SHARDS_TIMEOUT, then claim one each as usual."""

from __future__ import annotations

from pathlib import Path

from conftest import federation_env, free_address, run_cli


def test_clients_started_before_prepare_wait_for_the_shards_and_finish(spawn, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()  # an empty volume, as a node's before its prepare task has run
    address = free_address()
    env = federation_env(data, tmp_path, address, NUM_ROUNDS="2", SHARDS_TIMEOUT="300")
    server = spawn(["server"], **env)
    clients = [spawn(["client"], **env) for _ in range(3)]
    for client in clients:
        client.wait_for(r"waiting up to 300 s \(SHARDS_TIMEOUT\)", timeout=120)
    prepared = run_cli(["prepare"], cwd=tmp_path, **env)
    assert prepared.returncode == 0, prepared.stderr
    assert server.wait(timeout=300) == 0, server.output
    claimed = sorted(c.wait_for(r"claimed (shard_\d+)", timeout=5).group(1) for c in clients)
    assert claimed == ["shard_000", "shard_001", "shard_002"]
    assert [c.wait(timeout=60) for c in clients] == [0, 0, 0]
