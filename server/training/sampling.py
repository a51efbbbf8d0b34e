"""Which clients a round samples: the same ones for the same SEED and round, in every run.

Flower's SimpleClientManager samples with the unseeded global `random` over client ids that are
random per connection, so two runs with the same SEED (or a resumed run and an undisturbed one)
train different clients as soon as FRACTION_FIT < 1. Here the connected clients are put in a
stable order (by shard when the proxy carries one, then by the name the client joined with, then
by id as the last resort) and a generator seeded from (SEED, round, phase) picks from that order.
The choice needs nothing but the round number, so a resumed run needs no extra checkpoint state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.server.client_proxy import ClientProxy

from shared import secure_random

PHASES = {"fit": 0, "evaluate": 1}


def stable_key(proxy: ClientProxy) -> tuple[Any, ...]:
    """Shard first (join metadata, when the proxy has a `shard` attribute), then name, then cid."""
    shard = getattr(proxy, "shard", None) or None  # "": a client that named no shard (plain Flower)
    shard_key = (0, f"{shard:012d}") if isinstance(shard, int) else (0, str(shard)) if shard is not None else (1, "")
    return (*shard_key, str(getattr(proxy, "name", None) or ""), proxy.cid)


def seeded_sample(
    proxies: Sequence[ClientProxy], num_clients: int, seed: int, server_round: int, phase: str
) -> list[ClientProxy]:
    """`num_clients` of `proxies`, chosen by (seed, round, phase) over their stable order."""
    ordered = sorted(proxies, key=stable_key)
    rng = np.random.default_rng([seed, server_round, PHASES.get(phase, 2)])
    picked = sorted(rng.choice(len(ordered), size=num_clients, replace=False).tolist())
    return [ordered[i] for i in picked]


def poisson_sample(proxies: Sequence[ClientProxy], rate: float) -> list[ClientProxy]:
    """Each of `proxies` with probability `rate`, independently, from the secure source (DP=client)."""
    ordered = sorted(proxies, key=stable_key)
    return [proxy for proxy, picked in zip(ordered, secure_random.bernoulli(len(ordered), rate)) if picked]
