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
            f"MIN_SHARD_SIZE={min_size}: lower NUM_SHARDS, or MIN_SHARD_SIZE to at most "
            f"{max(num_examples // num_shards, 0)}, or use a larger data set "
            "(for load tests DATASET=synthetic, sized by SYNTHETIC_EXAMPLES)"
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
    """The FedAvg paper's scheme (McMahan et al. 2017): sort the examples by label, cut them into
    NUM_SHARDS x LABELS_PER_CLIENT pieces of equal size, and deal each shard LABELS_PER_CLIENT
    pieces at random. Every example is used; a shard holds at most about LABELS_PER_CLIENT labels
    (a piece may straddle two labels, and a shard may be dealt two pieces of one label).
    """
    classes = np.unique(labels)
    if labels_per_shard > len(classes):
        raise BadInput(
            f"LABELS_PER_CLIENT={labels_per_shard} is more than the {len(classes)} labels "
            f"of the data set: use at most {len(classes)}"
        )
    shuffled = rng.permutation(len(labels))  # the order within a label is random
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, num_shards * labels_per_shard)
    dealt = rng.permutation(len(pieces)).reshape(num_shards, labels_per_shard)
    parts = [np.sort(np.concatenate([pieces[i] for i in row])) for row in dealt]
    smallest = min(len(p) for p in parts)
    if smallest < min_size:
        raise BadInput(
            f"LABELS_PER_CLIENT={labels_per_shard} with NUM_SHARDS={num_shards} gives a shard of "
            f"{smallest} examples, below MIN_SHARD_SIZE={min_size}: lower NUM_SHARDS or MIN_SHARD_SIZE"
        )
    return parts


# Version of each scheme's output, written into the manifest's settings: shards made by an earlier
# scheme of the same name (pathological before it dropped classes) are then "other
# settings", refused by prepare unless --force. A scheme missing here is at its first version.
SCHEME_VERSIONS = {"pathological": 2}


def split_like(train_labels: np.ndarray, parts: list[np.ndarray], test_labels: np.ndarray,
               rng: np.random.Generator) -> list[np.ndarray]:  # fmt: skip
    """An official test set divided among the shards, label by label, in proportion to each
    shard's training examples of that label: disjoint, all of it used, and every shard tested
    on the label mix it trains on (a label no shard trains on is divided evenly)."""
    classes = np.unique(np.concatenate([train_labels, test_labels]))
    pieces: list[list[np.ndarray]] = [[] for _ in parts]
    for label in classes:
        pool = rng.permutation(np.flatnonzero(test_labels == label))
        weights = np.array([np.count_nonzero(train_labels[p] == label) for p in parts], dtype=np.float64)
        if weights.sum() == 0:
            weights[:] = 1.0
        cuts = np.floor(np.cumsum(weights)[:-1] / weights.sum() * len(pool)).astype(int)
        for shard, piece in enumerate(np.split(pool, cuts)):
            pieces[shard].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]


def coverage(labels: np.ndarray, parts: list[np.ndarray]) -> tuple[list[list[int]], int, list[int]]:
    """What the shards cover: each shard's classes, the examples no shard holds, and the
    classes no shard holds."""
    classes = [sorted(int(c) for c in np.unique(labels[p])) for p in parts]
    used = sum(len(p) for p in parts)
    dropped = sorted(set(int(c) for c in np.unique(labels)) - {c for cs in classes for c in cs})
    return classes, len(labels) - used, dropped


def mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean entropy (nats) of the shards' label distributions: lower is more skewed."""
    classes = np.unique(labels)
    values = []
    for p in parts:
        counts = np.array([np.count_nonzero(labels[p] == c) for c in classes], dtype=float)
        share = counts[counts > 0] / max(counts.sum(), 1)
        values.append(float(-(share * np.log(share)).sum()))
    return float(np.mean(values))


def dirichlet_expected_entropy(
    labels: np.ndarray, num_shards: int, alpha: float, rng: np.random.Generator, draws: int = 200
) -> tuple[float, float, float]:
    """Mean label entropy of Dir(alpha) shards drawn without a minimum size (what DIRICHLET_ALPHA
    asks for), and its 5th and 95th percentiles over `draws` draws. Counts only, no example is moved."""
    classes, sizes = np.unique(labels, return_counts=True)
    values = []
    for _ in range(draws):
        counts = rng.dirichlet([alpha] * num_shards, size=len(classes)) * sizes[:, None]  # class x shard
        shard_totals = counts.sum(axis=0)
        share = counts / np.where(shard_totals > 0, shard_totals, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(share > 0, share * np.log(share), 0.0).sum(axis=0)
        values.append(float(entropy.mean()))
    return float(np.mean(values)), float(np.percentile(values, 5)), float(np.percentile(values, 95))
