"""Split example indices into client shards: IID, Dirichlet label skew, or a few labels each.

Every function is deterministic for a given generator, returns disjoint sorted index arrays,
and raises BadInput when some shard would get fewer than `min_size` examples.
"""

from __future__ import annotations

import numpy as np

from shared.errors import BadInput

DIRICHLET_TRIES = 200


def iid(num_examples: int, num_shards: int, min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    if num_examples // num_shards < min_size:
        raise BadInput(
            f"{num_examples} examples cannot give NUM_SHARDS={num_shards} shards of at least "
            f"MIN_SHARD_SIZE={min_size}: lower NUM_SHARDS or MIN_SHARD_SIZE"
        )
    return [np.sort(part) for part in np.array_split(rng.permutation(num_examples), num_shards)]


def dirichlet(
    labels: np.ndarray, num_shards: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each class is spread over the shards by proportions drawn from Dir(alpha)."""
    classes = np.unique(labels)
    for _ in range(DIRICHLET_TRIES):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_shards)) * len(members)).astype(int)[:-1]
            for shard, part in zip(shards, np.split(members, cuts)):
                shard.append(part)
        parts = [np.sort(np.concatenate(s)) for s in shards]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise BadInput(
        f"DIRICHLET_ALPHA={alpha} left a shard below MIN_SHARD_SIZE={min_size} in "
        f"{DIRICHLET_TRIES} draws: raise DIRICHLET_ALPHA, or lower NUM_SHARDS or MIN_SHARD_SIZE"
    )


def pathological(
    labels: np.ndarray, num_shards: int, labels_per_shard: int, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each shard holds exactly `labels_per_shard` labels, dealt round-robin as in FedAvg's paper.

    The examples of a label are divided evenly among the shards that hold it; labels that no
    shard is dealt (fewer shards x labels than classes) are left out.
    """
    classes = np.unique(labels)
    if labels_per_shard > len(classes):
        raise BadInput(
            f"LABELS_PER_CLIENT={labels_per_shard} is more than the {len(classes)} labels "
            f"of the data set: use at most {len(classes)}"
        )
    order = rng.permutation(classes)
    dealt = [
        [order[(s * labels_per_shard + j) % len(classes)] for j in range(labels_per_shard)] for s in range(num_shards)
    ]
    holders = {c: [s for s in range(num_shards) if c in dealt[s]] for c in classes}
    shards: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
    for c, owners in holders.items():
        if owners:
            members = rng.permutation(np.flatnonzero(labels == c))
            for s, part in zip(owners, np.array_split(members, len(owners))):
                shards[s].append(part)
    parts = [np.sort(np.concatenate(s)) for s in shards]
    smallest = min(len(p) for p in parts)
    if smallest < min_size:
        raise BadInput(
            f"LABELS_PER_CLIENT={labels_per_shard} with NUM_SHARDS={num_shards} gives a shard of "
            f"{smallest} examples, below MIN_SHARD_SIZE={min_size}: lower NUM_SHARDS or "
            "MIN_SHARD_SIZE, or raise LABELS_PER_CLIENT"
        )
    return parts
