"""Claim one shard of DATA_DIR for this client, exclusively, for as long as the process lives.

A claim is an exclusive flock on the shard's shard.json: atomic when many clients start at the
same instant, works on a read-only mount, and the kernel drops it when the process dies, so a
crashed or finished client leaves no stale claim behind for the next run.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from client.data.shards import SHARD_META, shard_dirs, shard_name
from shared.errors import BadInput, NoFreeShard


@contextmanager
def claim_shard(
    data_dir: Path, shard_id: int | None = None, site_shards: tuple[int, ...] | None = None
) -> Iterator[Path]:
    """Yield the folder of a shard that no other live client holds; with `site_shards`
    (SITE_SHARDS) only one of those: another site serves the others."""
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
    for folder in folders:
        fd = os.open(folder / SHARD_META, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield folder
        finally:
            os.close(fd)  # closing the last descriptor releases the lock
        return
    if shard_id is not None:
        raise NoFreeShard(
            f"shard {shard_name(shard_id)} in DATA_DIR={data_dir} is claimed by another client: "
            "pick another SHARD_ID or stop that client"
        )
    raise NoFreeShard(
        f"all {len(folders)} shards in DATA_DIR={data_dir} are claimed by other clients: run at most "
        f"{len(folders)} clients, or prepare more shards (raise NUM_SHARDS)"
    )
