"""Many logical clients in one process (CLIENTS_PER_PROCESS): load tests, and many small devices
emulated on a few machines.

Why in one process: a client process carries its own PyTorch runtime (about 200 MB in a
container), so a machine holds a few dozen; logical clients share it, and each costs its shard
and a model. Each still is a client in every way the server can see: its own shard claim, its
own gRPC stream, join value and seed, its own state; they share one process, so they share its
machine and are not isolated from each other (a bug in a user's task that corrupts the process
ends them all; one whose training raises fails only that client's fit).

All are loaded and built first, one after the other (a shard or task that cannot work fails
the process before any connection), then all join the server at once, each a task of the
process's one event loop (client/wiring.py: an idle stream costs no CPU), named after its shard,
which prefixes its log lines; at most TRAINING_SLOTS of them train or evaluate at once, the
others wait their turn. The first keeps the final model's copy for the process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from client.claim import Claim, candidate_folders, claim_free, no_free_shard
from client.wiring import block_on
from shared.errors import ExitCode, FlowerpotError
from shared.settings import Settings

log = logging.getLogger("flowerpot.client")

# (shard folder, training slot, keeps the final model) -> the built client's serve()
Serve = Callable[[], Coroutine[Any, Any, None]]
Ready = Callable[[Path, AbstractContextManager[Any], bool], Serve]

# The logical client whose task (or answer thread: client/wiring.py's in_thread) runs: its shard.
LOGICAL_CLIENT: ContextVar[str | None] = ContextVar("logical_client", default=None)


class LogicalClientFailed(FlowerpotError):
    """Logical clients of this process ended without completing the run: the exit status is
    the first one's."""


class _ClientName(logging.Filter):
    """Prefixes the lines a logical client logs with its shard's name."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = LOGICAL_CLIENT.get()
        if name is not None and not getattr(record, "_flowerpot_named", False):
            record.msg, record._flowerpot_named = f"{name}: {record.msg}", True
        return True


def run_fleet(settings: Settings, site_shards: tuple[int, ...] | None, ready: Ready) -> None:
    """Claim up to CLIENTS_PER_PROCESS free shards and serve each until all end."""
    wanted = settings.clients_per_process
    folders = candidate_folders(settings.data_dir, settings.shard_id, site_shards)
    claims = claim_free(folders, wanted)
    if not claims:
        raise no_free_shard(settings.data_dir, folders, settings.shard_id)
    if len(claims) < wanted:
        log.warning(
            "starting %d of CLIENTS_PER_PROCESS=%d logical clients: only %d of the %d shards in DATA_DIR=%s "
            "are free (prepare more shards, raise NUM_SHARDS, or lower CLIENTS_PER_PROCESS)",
            len(claims), wanted, len(claims), len(folders), settings.data_dir,
        )  # fmt: skip
    else:
        log.info("starting %d logical clients, at most %d training at once", len(claims), settings.training_slots)
    slots = threading.BoundedSemaphore(settings.training_slots)
    outcomes: dict[str, BaseException | None] = {}
    named = _ClientName()
    logging.getLogger("flowerpot").addFilter(named)
    log.addFilter(named)

    async def one(claim: Claim, serve: Serve) -> None:
        LOGICAL_CLIENT.set(claim.folder.name)  # this task's own context: its lines, its threads
        try:
            await serve()
            outcomes[claim.folder.name] = None
        except asyncio.CancelledError:  # the loop itself is ending: not this client's outcome
            raise
        except BaseException as exc:  # recorded and said at the end (a task's sys.exit too); the others go on
            outcomes[claim.folder.name] = exc
            if isinstance(exc, FlowerpotError):
                log.error("stopped: %s", exc)
            else:
                log.error("crashed", exc_info=exc)
        finally:
            claim.release()

    async def all_of(clients: list[Serve]) -> None:
        await asyncio.gather(*(one(claim, serve) for claim, serve in zip(claims, clients)))

    try:
        built = time.monotonic()
        clients = [ready(claim.folder, slots, i == 0) for i, claim in enumerate(claims)]
        log.info("built %d logical clients in %.1f s; joining the server", len(clients), time.monotonic() - built)
        block_on(all_of(clients))
    finally:
        for claim in claims:  # a stop (SIGTERM) ends the process: its claims go with it
            claim.release()
        log.removeFilter(named)
        logging.getLogger("flowerpot").removeFilter(named)
    raise_first_failure(outcomes)


def raise_first_failure(outcomes: dict[str, BaseException | None]) -> None:
    failed = {name: exc for name, exc in sorted(outcomes.items()) if exc is not None}
    if not failed:
        log.info("all %d logical clients completed the run", len(outcomes))
        return
    name, first = next(iter(failed.items()))
    code = first.code if isinstance(first, FlowerpotError) else ExitCode.CRASH
    raise LogicalClientFailed(
        f"{len(failed)} of {len(outcomes)} logical clients did not complete the run; {name}'s reason: {first}"
        + ("" if isinstance(first, FlowerpotError) else " (its traceback is logged above)"),
        code,
    )
