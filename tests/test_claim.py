"""Shard claims: exclusive and atomic under concurrent starts, released when a process ends."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import stat
from pathlib import Path

import pytest

from client.claim import claim_shard
from shared.errors import BadInput, NoFreeShard


def hold_claim(data_dir: str, barrier, results, release, shard_id=None) -> None:
    barrier.wait()
    try:
        with claim_shard(Path(data_dir), shard_id) as folder:
            results.put(folder.name)
            release.wait(30)
    except NoFreeShard as exc:
        results.put(f"refused: {exc}")


def start_claimers(data_dir: Path, count: int):
    ctx = mp.get_context("spawn")
    barrier, results, release = ctx.Barrier(count), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=hold_claim, args=(str(data_dir), barrier, results, release)) for _ in range(count)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=30) for _ in procs)
    return procs, outcomes, release


def test_simultaneous_clients_get_distinct_shards_and_the_extra_one_is_refused(data_dir: Path) -> None:
    procs, outcomes, release = start_claimers(data_dir, 4)
    release.set()
    for p in procs:
        p.join(10)
    claimed = [o for o in outcomes if not o.startswith("refused")]
    refused = [o for o in outcomes if o.startswith("refused")]
    assert claimed == ["shard_000", "shard_001", "shard_002"]
    assert len(refused) == 1 and "all 3 shards in DATA_DIR=" in refused[0]
    assert "run at most 3 clients" in refused[0]


def test_claims_end_with_the_process_even_when_it_is_killed(data_dir: Path) -> None:
    procs, outcomes, _ = start_claimers(data_dir, 3)
    assert outcomes == ["shard_000", "shard_001", "shard_002"]
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].join(10)
    with claim_shard(data_dir) as folder:  # the killed process's shard is free again
        assert folder.name in outcomes
    for p in procs:
        p.kill()
        p.join(10)


def test_claims_work_on_a_read_only_shard_folder(data_dir: Path) -> None:
    for path in [data_dir, *data_dir.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        with claim_shard(data_dir) as first, claim_shard(data_dir) as second:
            assert first != second
    finally:
        for path in [data_dir, *data_dir.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_a_directory_that_is_one_shard_is_that_shard(data_dir: Path) -> None:
    lone = data_dir / "shard_001"
    with claim_shard(lone) as folder:
        assert folder == lone
    with claim_shard(lone), pytest.raises(NoFreeShard, match="all 1 shards"), claim_shard(lone):
        pass


def test_shard_id_pins_one_shard(data_dir: Path) -> None:
    with claim_shard(data_dir, shard_id=2) as folder:
        assert folder.name == "shard_002"
        with pytest.raises(NoFreeShard, match=r"shard_002 .* is claimed by another client"), claim_shard(data_dir, 2):
            pass
    with pytest.raises(BadInput, match="has no shard_007"), claim_shard(data_dir, 7):
        pass
