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


@pytest.mark.parametrize(("shards", "k"), [(5, 2), (10, 2), (3, 2), (4, 3)])
def test_pathological_is_the_fedavg_papers_scheme(shards: int, k: int) -> None:
    """Sorted by label, cut into shards x k equal pieces, k pieces dealt to each shard, all data used."""
    parts = partition.pathological(LABELS, shards, k, 10, rng(5))
    assert_disjoint_cover(parts, 1000)  # every example is used
    sizes = {len(p) for p in parts}
    assert max(sizes) - min(sizes) <= k  # equal pieces (up to rounding)
    pieces = 1000 // (shards * k)
    most_labels = k * (1 + -(-pieces // 100))  # a piece of `pieces` sorted examples spans this many labels at most
    assert all(len(np.unique(LABELS[p])) <= most_labels for p in parts)
    again = partition.pathological(LABELS, shards, k, 10, rng(5))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_pathological_on_three_clients_drops_no_class() -> None:
    """The earlier scheme with 3 clients x 2 labels kept 6 of the 10 classes (1,080 of 1,797 on digits)."""
    parts = partition.pathological(LABELS, 3, 2, 10, rng(0))
    classes, unused, dropped = partition.coverage(LABELS, parts)
    assert unused == 0 and dropped == []
    assert {c for cs in classes for c in cs} == set(range(10))


def test_one_label_per_piece_gives_shards_of_at_most_k_labels() -> None:
    parts = partition.pathological(LABELS, 10, 2, 10, rng(3))  # 20 pieces of 50: one label each
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


def test_dirichlet_skew_is_measured_against_what_alpha_asks() -> None:
    parts = partition.dirichlet(LABELS, 5, 0.5, 10, rng(4))
    achieved = partition.mean_label_entropy(LABELS, parts)
    assert achieved == pytest.approx(label_entropy(parts))
    expected, p5, p95 = partition.dirichlet_expected_entropy(LABELS, 5, 0.5, rng(9))
    assert 0 < p5 < expected < p95 < np.log(10)
    strict, _, _ = partition.dirichlet_expected_entropy(LABELS, 20, 0.1, rng(9))
    forced = partition.dirichlet(LABELS, 20, 0.1, 10, rng(4))  # the minimum size rejects skewed draws
    assert partition.mean_label_entropy(LABELS, forced) > strict


def test_pathological_refuses_more_labels_than_exist() -> None:
    with pytest.raises(BadInput, match=r"LABELS_PER_CLIENT=11 is more than the 10 labels"):
        partition.pathological(LABELS, 5, 11, 10, rng(0))


def test_pathological_refuses_tiny_shards() -> None:
    with pytest.raises(BadInput, match="below MIN_SHARD_SIZE=150"):
        partition.pathological(LABELS, 10, 1, 150, rng(0))
