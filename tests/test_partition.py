"""Partitioners: sizes, disjointness, determinism, label skew, minimum sizes."""

from __future__ import annotations

import numpy as np
import pytest

from client.data import partition
from shared.errors import BadInput

LABELS = np.repeat(np.arange(10), 100)  # 1000 examples, 100 per label
rng = np.random.default_rng


def assert_disjoint_cover(parts: list[np.ndarray], total: int, complete: bool = True) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "shards overlap"
    assert joined.min() >= 0 and joined.max() < total
    if complete:
        assert len(joined) == total


def label_entropy(parts: list[np.ndarray]) -> float:
    """Mean entropy of the shards' label distributions (lower = more skewed)."""
    values = []
    for p in parts:
        counts = np.bincount(LABELS[p], minlength=10) / len(p)
        nz = counts[counts > 0]
        values.append(-(nz * np.log(nz)).sum())
    return float(np.mean(values))


def test_iid_sizes_disjoint_and_deterministic() -> None:
    parts = partition.iid(1000, 7, 20, rng(1))
    assert_disjoint_cover(parts, 1000)
    assert {len(p) for p in parts} <= {142, 143}
    again = partition.iid(1000, 7, 20, rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition.iid(1000, 7, 20, rng(2))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_refuses_shards_below_minimum() -> None:
    with pytest.raises(BadInput, match=r"NUM_SHARDS=60 .*MIN_SHARD_SIZE=20"):
        partition.iid(1000, 60, 20, rng(0))


def test_dirichlet_disjoint_complete_deterministic_and_min_size() -> None:
    parts = partition.dirichlet(LABELS, 5, 0.5, 30, rng(3))
    assert_disjoint_cover(parts, 1000)
    assert min(len(p) for p in parts) >= 30
    again = partition.dirichlet(LABELS, 5, 0.5, 30, rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_smaller_alpha_skews_labels_more() -> None:
    skewed = label_entropy(partition.dirichlet(LABELS, 5, 0.1, 10, rng(4)))
    mild = label_entropy(partition.dirichlet(LABELS, 5, 100.0, 10, rng(4)))
    iid = label_entropy(partition.iid(1000, 5, 10, rng(4)))
    assert skewed < mild - 0.5
    assert abs(mild - iid) < 0.1


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    with pytest.raises(BadInput, match=r"DIRICHLET_ALPHA=0\.01"):
        partition.dirichlet(LABELS, 10, 0.01, 99, rng(0))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_each_shard_exactly_k_labels(k: int) -> None:
    parts = partition.pathological(LABELS, 5, k, 10, rng(5))
    assert_disjoint_cover(parts, 1000, complete=(5 * k >= 10))
    assert [len(np.unique(LABELS[p])) for p in parts] == [k] * 5


def test_pathological_refuses_more_labels_than_exist() -> None:
    with pytest.raises(BadInput, match=r"LABELS_PER_CLIENT=11 is more than the 10 labels"):
        partition.pathological(LABELS, 5, 11, 10, rng(0))


def test_pathological_refuses_tiny_shards() -> None:
    with pytest.raises(BadInput, match="below MIN_SHARD_SIZE=150"):
        partition.pathological(LABELS, 10, 1, 150, rng(0))
