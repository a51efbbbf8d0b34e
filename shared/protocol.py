"""The gRPC metadata a Flowerpot client sends when it joins (both wiring modules use it)."""

from __future__ import annotations

import json
from typing import Any

CLIENT_NAME_KEY = "flowerpot-client"  # the name the client gives itself (a certificate's name wins)
# What the server checks before a client trains (issue 10): one JSON object, ASCII-escaped (gRPC
# metadata values are ASCII) with the keys below. A plain Flower client sends none of it.
JOIN_KEY = "flowerpot-join"
# Flowerpot's version (pyproject.toml's, a test keeps them equal): a server refuses a client of
# another major.minor version, whose messages and checks may differ from its own.
VERSION = "0.1.0"


def join_value(site: str, shard: str, shard_checksum: str, input_fingerprint: dict[str, Any]) -> str:
    """The JOIN_KEY value: version, site, shard (name and data checksum), and what defines the
    client's input (classes, image size, channels, normalisation)."""
    fields = {
        "version": VERSION,
        "site": site,
        "shard": shard,
        "shard_checksum": shard_checksum,
        "input": input_fingerprint,
    }
    return json.dumps(fields, sort_keys=True)  # ASCII: json escapes everything else


def compatible(version: str) -> bool:
    """Same major.minor as this side."""
    return version.split(".")[:2] == VERSION.split(".")[:2]


# Every text a client sends (its name, site, shard, checksum, metric texts) reaches the server's
# log, history.json, sites.json and metric labels: it is cut to a short length and its control
# characters (newlines that would forge log lines, escapes that would drive a terminal) replaced.
# 64: the longest X.509 common name; SITE_NAME and CLIENT_NAME are held to it at the client's start.
MAX_NAME = 64
MAX_TEXT = 256  # a text metric


def clean_text(value: object, limit: int = MAX_NAME) -> str:
    """`value` as printable text of at most `limit` characters ("?" for each unprintable one)."""
    text = str(value)
    cut = text[:limit]
    return "".join(ch if ch.isprintable() else "?" for ch in cut) + ("..." if len(text) > limit else "")


def text_problem(value: str, limit: int = MAX_NAME) -> str | None:
    """Why a name a client would send is refused at its start, or None."""
    if len(value) > limit:
        return f"{len(value)} characters, more than {limit}"
    if not value.isprintable():
        return "it holds control characters"
    return None
