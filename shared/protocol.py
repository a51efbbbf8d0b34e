"""The gRPC metadata a Flowerpot client sends when it joins (both wiring modules use it)."""

from __future__ import annotations

import json
import re
from typing import Any

CLIENT_NAME_KEY = "flowerpot-client"  # the name the client gives itself (a certificate's name wins)
# What the server checks before a client trains (issue 10): one JSON object, ASCII-escaped (gRPC
# metadata values are ASCII) with the keys below. A plain Flower client sends none of it.
JOIN_KEY = "flowerpot-join"
# Flowerpot's version (pyproject.toml's, a test keeps them equal): a server refuses a client of
# another major.minor version, whose messages and checks may differ from its own.
VERSION = "0.1.0"

# A task's METRICS (client/tasks/): declared at join, inside the input ("metrics"), since the
# server never imports a task. Both sides check a declaration by these rules.
MAX_TASK_METRICS = 16
TASK_METRIC_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
TASK_METRIC_TYPES = ("ratio", "number")  # ratio: a number in [0, 1]


def join_value(site: str, shard: str, shard_checksum: str, input_fingerprint: dict[str, Any]) -> str:
    """The JOIN_KEY value: version, site, shard (name and data checksum), and what defines the
    client's input (classes, image size, channels, normalisation, and its task: name, model
    layout and METRICS)."""
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
