"""Which site and shard each client trains, and the checks that keep a federation of sites honest.

A Flowerpot client sends, when it joins, its protocol and Flowerpot versions, its site (SITE_NAME), its shard with the
checksum of the shard's data, and what defines its input (classes, image size, channels,
normalisation): shared/protocol.py. Before the client is seated the server refuses it, naming
the reason, when
- its protocol version is not the server's;
- it runs another task than the server's TASK (the task defines the run);
- its input differs from the run's (CLASSES on the server, else the first Flowerpot client's):
  clients that disagree on what label 3 means, on the image size, or on the shapes of their
  task's model or its METRICS, cannot train one model;
- another connected client already trains the same data (same data checksum, whatever the
  shard's name or site): its updates would count twice.
A client that comes back with its own site and shard while its old stream is still registered
replaces the old stream only when that stream is dead: gRPC sees it ended (a killed process's
socket closes at once), or the keepalive ping goes unanswered within `Sites.dead_within` seconds
(2 x KEEPALIVE_SECONDS). A live old stream keeps its shard: the newcomer is refused, naming it, so
a second process with a copy of a site's shard cannot push out the site's healthy connection.
Another site with the same data is always refused: only the site that held it may rejoin.
Under client certificates the operator may also say which certificate trains which shards
(SHARD_OWNERS): a claim of another certificate's shard is refused however early it comes.

A plain Flower client sends none of this: it joins unchecked, with one warning.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from server.transport.stream import NamedClientProxy
from shared.protocol import (
    BUILTIN_TASK,
    FLOWERPOT_VERSION,
    MAX_TASK_METRICS,
    TASK_METRIC_NAME,
    TASK_METRIC_TYPES,
    VERSION,
    clean_text,
    compatible,
)

log = logging.getLogger("flowerpot.server")

SHARD_NAME = re.compile(r"shard_(\d+)")  # client/data/shards.py names shard N shard_00N
CHECK_SECONDS = 0.25  # how often a newcomer looks whether the old connection has died

# What a difference in each part of the input fingerprint is called in a refusal.
INPUT_NAMES = {
    "dataset": "DATASET",
    "classes": "classes",
    "image_size": "IMAGE_SIZE",
    "channels": "IMAGE_CHANNELS",
    "mean": "normalisation mean",
    "std": "normalisation std",
    "task": "TASK",
    "model": "the task's model",
    "metrics": "the task's METRICS",
}


@dataclass(frozen=True)
class Join:
    """What a Flowerpot client said about itself when it joined."""

    protocol: int  # shared/protocol.py's VERSION on the client's side
    version: str  # its Flowerpot version
    site: str
    shard: str
    shard_checksum: str
    input: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> Join:
        """ValueError when `text` is not a join value of shared/protocol.py."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("input"), dict):
            raise ValueError("not a JSON object with an input")
        protocol = data.get("protocol", 1)  # Flowerpot 0.1.0 sent none: protocol 1
        if not isinstance(protocol, int) or isinstance(protocol, bool):
            raise ValueError(f"protocol {protocol!r} is not a whole number")
        # Cut and cleaned (shared/protocol.py): they reach the log, sites.json and metric labels.
        version, site, shard, checksum = (clean_text(data[k]) for k in ("version", "site", "shard", "shard_checksum"))
        return cls(protocol, version, site, shard, checksum, data["input"])


@dataclass
class _Holder:
    site: str
    shard: str
    who: str
    proxy: NamedClientProxy
    host: str = ""  # the peer's address without its port


class Sites:
    """The run's input (agreed by all) and which connected client holds which shard's data."""

    def __init__(
        self,
        classes: tuple[str, ...] = (),
        task: str = BUILTIN_TASK,
        owners: dict[str, tuple[int, ...]] | None = None,
        dead_within: float = 40.0,
    ) -> None:
        self._lock = threading.Lock()
        self.owners = owners or {}  # SHARD_OWNERS: certificate name -> the shard numbers it may claim
        self.dead_within = dead_within  # seconds after which a connection that did not answer is dead
        self.classes = list(classes)  # CLASSES on the server: the run's class list, whoever comes first
        self.task = task  # TASK on the server: the task defines the run (its checkpoints, its model files)
        self._input: dict[str, Any] | None = None  # the run's input: the first Flowerpot client's
        self._input_from = ""
        self._holders: dict[str, _Holder] = {}  # data checksum -> the connected client training it

    def enter(self, join_text: str | None, who: str, proxy: NamedClientProxy, peer: str = "") -> str | None:
        """Check a joining client and record its shard on `proxy` (site, shard) and here; why it
        is refused, or None. Every entered proxy must `leave`."""
        if join_text is None:
            log.warning(
                "client %s sent no Flowerpot join metadata (a plain Flower client?): its version, site, shard "
                "and input are not checked",
                who,
            )
            return None
        try:
            join = Join.parse(join_text)
        except (ValueError, KeyError, TypeError) as exc:
            return f"its join metadata is malformed ({exc.__class__.__name__}): run a Flowerpot client"
        if not compatible(join.protocol):
            return (
                f"it speaks protocol {join.protocol} (Flowerpot {join.version}), this server protocol {VERSION} "
                f"(Flowerpot {FLOWERPOT_VERSION}): run the same Flowerpot version on the server and every client "
                "(update the older side)"
            )
        proxy.site, proxy.shard = join.site, join.shard
        refusal = self._owner_refusal(proxy, join)
        if refusal is not None:
            return refusal
        host = peer.rsplit(":", 1)[0]
        deadline: float | None = None
        while True:
            with self._lock:
                refusal = self._input_refusal(join.input)
                if refusal is not None:
                    return refusal
                holder = self._holders.get(join.shard_checksum)
                # A rejoin (the same site, shard, name and machine) may replace its dead connection;
                # anything else holding the same data is a duplicate. Replicas sharing one
                # certificate on two machines differ by machine, so neither evicts the other.
                rejoin = holder is not None and (holder.site, holder.shard, holder.proxy.name, holder.host) == (
                    join.site,
                    join.shard,
                    proxy.name,
                    host,
                )
                if holder is not None and not rejoin:
                    return (
                        f"its shard {join.shard} of site {join.site} holds the same data (checksum "
                        f"{join.shard_checksum[:12]}) as shard {holder.shard} that client {holder.who} of site "
                        f"{holder.site} is already training: each shard is trained by one client only; give each "
                        "site its own SITE_SHARDS (the same NUM_SHARDS and SEED everywhere) and prepare again"
                    )
                if holder is None or not holder.proxy.alive():
                    if self._input is None:
                        self._input, self._input_from = dict(join.input), who
                    self._holders[join.shard_checksum] = _Holder(join.site, join.shard, who, proxy, host)
                    break
                if deadline is not None and time.monotonic() > deadline:
                    return (
                        f"shard {join.shard} of site {join.site} is trained by client {holder.who}, whose connection "
                        f"is alive (it answered for {self.dead_within:g} s): one client per shard; stop the other "
                        "process first (a restarted client gets its place back as soon as its old connection is gone)"
                    )
            if deadline is None:
                deadline = time.monotonic() + self.dead_within
                log.info(
                    "client %s claims shard %s of site %s, held by client %s: waiting up to %g s to see whether "
                    "that connection is dead",
                    who, join.shard, join.site, holder.who, self.dead_within,
                )  # fmt: skip
            if not proxy.alive():
                return "its stream ended while it waited for the shard"
            time.sleep(CHECK_SECONDS)
        if holder is not None:
            log.warning(
                "client %s rejoined with shard %s of site %s: it replaces the old connection %s, which is gone",
                who,
                join.shard,
                join.site,
                holder.who,
            )
            holder.proxy.refuse(f"replaced by a new connection of site {join.site} with shard {join.shard}")
        return None

    def _owner_refusal(self, proxy: NamedClientProxy, join: Join) -> str | None:
        """SHARD_OWNERS: a certificate may claim only the shards the operator gave it."""
        if not self.owners or not proxy.certificate:
            return None
        given = self.owners.get(proxy.certificate, ())
        match = SHARD_NAME.fullmatch(join.shard)
        if match is not None and int(match.group(1)) in given:
            return None
        mine = ",".join(str(i) for i in given) or "none"
        return (
            f"certificate {proxy.certificate} claims shard {join.shard}, but the server's SHARD_OWNERS gives it "
            f"shards {mine}: set this site's SITE_SHARDS to its own shards, or ask the operator to add it to "
            "SHARD_OWNERS"
        )

    def leave(self, proxy: NamedClientProxy) -> None:
        """Forget what `proxy` held; idempotent."""
        with self._lock:
            for checksum in [c for c, h in self._holders.items() if h.proxy is proxy]:
                del self._holders[checksum]

    def run_metrics(self) -> dict[str, str]:
        """The extra metrics the run's task declared (METRICS, agreed by every client), {} until
        the first Flowerpot client has joined."""
        with self._lock:
            declared = (self._input or {}).get("metrics")
        return dict(declared) if isinstance(declared, dict) else {}

    def _input_refusal(self, given: dict[str, Any]) -> str | None:
        task = str(given.get("task", BUILTIN_TASK))  # clients of before tasks ran the built-in one
        if task != self.task:
            return (
                f"it runs TASK={task}, the run TASK={self.task}: set the same TASK on the server and every site "
                "(a model of another task cannot join this run)"
            )
        if (problem := metrics_problem(given.get("metrics", {}))) is not None:
            return f"its task's METRICS {problem}: fix the task's METRICS"
        if self.classes and given.get("dataset") == "folder" and given.get("classes") != self.classes:
            return (
                f"its input differs from the run's (the server's CLASSES): classes {_show(given.get('classes'))} "
                f"vs {_show(self.classes)}: set the same CLASSES on every site and prepare again"
            )
        if self._input is None:
            return None
        keys = [*INPUT_NAMES, *sorted((set(given) | set(self._input)) - set(INPUT_NAMES))]
        differences = [
            f"{INPUT_NAMES.get(key, key)} {_show(given.get(key))} vs {_show(self._input.get(key))}"
            for key in keys
            if given.get(key) != self._input.get(key)
        ]
        if not differences:
            return None
        return (
            f"its input differs from the run's (set by client {self._input_from}): {'; '.join(differences)}: "
            "prepare every site's data with the same DATASET, CLASSES, IMAGE_SIZE and IMAGE_CHANNELS, and run "
            "the same version of the task everywhere"
        )


def metrics_problem(declared: Any) -> str | None:
    """What is wrong with a joining client's declaration of its task's metrics, or None: the
    server keeps these metrics in every round's history, so it bounds them as the client did."""
    if not isinstance(declared, dict):
        return "is not a mapping of names to types"
    if len(declared) > MAX_TASK_METRICS:
        return f"declares {len(declared)} metrics, more than {MAX_TASK_METRICS}"
    for key, kind in declared.items():
        if not isinstance(key, str) or not TASK_METRIC_NAME.fullmatch(key):
            return f"names a metric {str(key)[:40]!r}"
        if kind not in TASK_METRIC_TYPES:
            return f"gives {key} the type {str(kind)[:40]!r}"
    return None


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)
