"""Which site and shard each client trains, and the checks that keep a federation of sites honest.

A Flowerpot client sends, when it joins, its version, its site (SITE_NAME), its shard with the
checksum of the shard's data, and what defines its input (classes, image size, channels,
normalisation): shared/protocol.py. Before the client is seated the server refuses it, naming
the reason, when
- its major.minor version is not the server's;
- its input differs from the run's (CLASSES on the server, else the first Flowerpot client's):
  clients that disagree on what label 3 means, or on the image size, cannot train one model;
- another connected client already trains the same data (same data checksum, whatever the
  shard's name or site): its updates would count twice.
A client that comes back with its own site and shard while its old stream is still registered
(the connection died, and keepalive has not noticed yet) replaces the old stream: the old one is
ended. Another site with the same data is always refused: only the site that held it may rejoin.

A plain Flower client sends none of this: it joins unchecked, with one warning.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

from server.transport.stream import NamedClientProxy
from shared.protocol import VERSION, clean_text, compatible

log = logging.getLogger("flowerpot.server")

# What a difference in each part of the input fingerprint is called in a refusal.
INPUT_NAMES = {
    "dataset": "DATASET",
    "classes": "classes",
    "image_size": "IMAGE_SIZE",
    "channels": "IMAGE_CHANNELS",
    "mean": "normalisation mean",
    "std": "normalisation std",
}


@dataclass(frozen=True)
class Join:
    """What a Flowerpot client said about itself when it joined."""

    version: str
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
        # Cut and cleaned (shared/protocol.py): they reach the log, sites.json and metric labels.
        version, site, shard, checksum = (clean_text(data[k]) for k in ("version", "site", "shard", "shard_checksum"))
        return cls(version, site, shard, checksum, data["input"])


@dataclass
class _Holder:
    site: str
    shard: str
    who: str
    proxy: NamedClientProxy
    host: str = ""  # the peer's address without its port


class Sites:
    """The run's input (agreed by all) and which connected client holds which shard's data."""

    def __init__(self, classes: tuple[str, ...] = ()) -> None:
        self._lock = threading.Lock()
        self.classes = list(classes)  # CLASSES on the server: the run's class list, whoever comes first
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
        if not compatible(join.version):
            return (
                f"it runs Flowerpot {join.version}, this server {VERSION}: run the same major.minor version "
                "on the server and every client (update the older side)"
            )
        proxy.site, proxy.shard = join.site, join.shard
        replaced = None
        with self._lock:
            refusal = self._input_refusal(join.input)
            if refusal is not None:
                return refusal
            holder = self._holders.get(join.shard_checksum)
            host = peer.rsplit(":", 1)[0]
            # A rejoin (the same site, shard, name and machine) replaces its dead connection;
            # anything else holding the same data is a live duplicate. Replicas sharing one
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
                    f"{holder.site} is already training: each shard is trained by one client only; give each site "
                    "its own SITE_SHARDS (the same NUM_SHARDS and SEED everywhere) and prepare again"
                )
            if holder is not None:
                replaced = holder
            if self._input is None:
                self._input, self._input_from = dict(join.input), who
            self._holders[join.shard_checksum] = _Holder(join.site, join.shard, who, proxy, host)
        if replaced is not None:
            log.warning(
                "client %s rejoined with shard %s of site %s: it replaces the old connection %s",
                who,
                join.shard,
                join.site,
                replaced.who,
            )
            replaced.proxy.refuse(f"replaced by a new connection of site {join.site} with shard {join.shard}")
        return None

    def leave(self, proxy: NamedClientProxy) -> None:
        """Forget what `proxy` held; idempotent."""
        with self._lock:
            for checksum in [c for c, h in self._holders.items() if h.proxy is proxy]:
                del self._holders[checksum]

    def _input_refusal(self, given: dict[str, Any]) -> str | None:
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
            "prepare every site's data with the same DATASET, CLASSES, IMAGE_SIZE and IMAGE_CHANNELS"
        )


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)
