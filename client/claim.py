"""Claim shards of DATA_DIR for this process's clients, exclusively, for as long as each lives.

A claim is an exclusive flock on the shard's shard.json: atomic when many clients start at the
same instant, works on a read-only mount, and the kernel drops it when the process dies, so a
crashed or finished client leaves no stale claim behind for the next run. A flock belongs to
its open file, not to the process: the logical clients of one process (CLIENTS_PER_PROCESS)
exclude each other as clients of two processes do, and each releases its own.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from client.data.shards import SHARD_META, shard_dirs, shard_name
from shared.errors import BadInput, NoFreeShard


class Claim:
    """One claimed shard's folder; `release` (idempotent) lets another client take it."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder, self._lock = folder, threading.Lock()
        self._fd: int | None = fd

    def release(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)  # closing the last descriptor releases the lock
                self._fd = None


def candidate_folders(
    data_dir: Path, shard_id: int | None = None, site_shards: tuple[int, ...] | None = None
) -> list[Path]:
    """The shard folders this client may claim: SITE_SHARDS' (another site serves the others),
    or SHARD_ID's, else all."""
    folders = shard_dirs(data_dir)
    if site_shards is not None and len(folders) > 1:
        folders = [f for f in folders if f.name in {shard_name(i) for i in site_shards}]
        if not folders:
            raise BadInput(
                f"SITE_SHARDS={','.join(map(str, site_shards))}: DATA_DIR={data_dir} holds none of these shards: "
                "run `flowerpot prepare` with the same SITE_SHARDS"
            )
    if shard_id is not None and len(folders) > 1:
        folders = [f for f in folders if f.name == shard_name(shard_id)]
        if not folders:
            raise BadInput(f"SHARD_ID={shard_id}: DATA_DIR={data_dir} has no {shard_name(shard_id)}")
    return folders


def claim_free(folders: list[Path], count: int) -> list[Claim]:
    """Up to `count` claims on folders no other live client holds, in the folders' order."""
    claims: list[Claim] = []
    for folder in folders:
        if len(claims) == count:
            break
        fd = os.open(folder / SHARD_META, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        claims.append(Claim(folder, fd))
    return claims


def no_free_shard(data_dir: Path, folders: list[Path], shard_id: int | None) -> NoFreeShard:
    if shard_id is not None:
        return NoFreeShard(
            f"shard {shard_name(shard_id)} in DATA_DIR={data_dir} is claimed by another client: "
            "pick another SHARD_ID or stop that client"
        )
    return NoFreeShard(
        f"all {len(folders)} shards in DATA_DIR={data_dir} are claimed by other clients: run at most "
        f"{len(folders)} clients, or prepare more shards (raise NUM_SHARDS)"
    )


@contextmanager
def claim_shard(
    data_dir: Path, shard_id: int | None = None, site_shards: tuple[int, ...] | None = None
) -> Iterator[Path]:
    """Yield the folder of a shard that no other live client holds."""
    folders = candidate_folders(data_dir, shard_id, site_shards)
    claims = claim_free(folders, 1)
    if not claims:
        raise no_free_shard(data_dir, folders, shard_id)
    try:
        yield claims[0].folder
    finally:
        claims[0].release()
