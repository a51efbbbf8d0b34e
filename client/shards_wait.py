"""Wait, with a bound, for this machine's prepare step to finish writing DATA_DIR's shards.

Where nothing starts the prepare step before the clients (Docker Swarm has no depends_on), a
client may start first and find no shards, or only some while prepare moves them in. prepare
writes the manifest last (client/data/shards.py), so once it is there every shard is in place.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from client.data.shards import MANIFEST, SHARD_META
from shared.errors import BadInput

log = logging.getLogger("flowerpot.client")

POLL_SECONDS = 0.5


def wait_for_shards(data_dir: Path, seconds: float) -> None:
    """Return once DATA_DIR holds prepared shards; after `seconds` (SHARDS_TIMEOUT) without them,
    refuse with one line. 0 does not wait: the claim that follows says what is missing."""
    if seconds <= 0 or _ready(data_dir):
        return
    log.info("waiting up to %g s (SHARDS_TIMEOUT) for the prepare step to write DATA_DIR=%s", seconds, data_dir)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        if _ready(data_dir):
            log.info("the shards in DATA_DIR=%s are ready", data_dir)
            return
    if any(data_dir.glob(f"shard_*/{SHARD_META}")):
        log.warning("DATA_DIR=%s has shards but no %s: using them as they are", data_dir, MANIFEST)
        return
    raise BadInput(
        f"DATA_DIR={data_dir} holds no prepared shards after SHARDS_TIMEOUT={seconds:g} s: run the prepare "
        "step on this machine (`flowerpot prepare`; on Docker Swarm see `docker service logs STACK_prepare`), "
        "or raise SHARDS_TIMEOUT"
    )


def _ready(data_dir: Path) -> bool:
    return (data_dir / MANIFEST).is_file() or (data_dir / SHARD_META).is_file()
