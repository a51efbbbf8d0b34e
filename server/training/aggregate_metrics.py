"""Aggregation of the metrics clients report; metrics the server does not know never break it."""

from __future__ import annotations

from collections.abc import Iterator
from numbers import Real

import numpy as np
from flwr.common import Metrics, Scalar

from shared.protocol import PRIVACY_METRICS


def numbers(metrics: Metrics) -> Iterator[tuple[str, float]]:
    """The metrics that are numbers (not booleans, text or bytes), as floats."""
    for key, value in metrics.items():
        if isinstance(value, Real) and not isinstance(value, bool):
            yield key, float(value)


def weighted_average(results: list[tuple[int, Metrics]]) -> dict[str, Scalar]:
    """Average each numeric metric weighted by example counts (the privacy metrics: their
    maximum); text and bytes are skipped here (they stay in the per-client records of the history)."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    most: dict[str, float] = {}
    for num_examples, metrics in results:
        for key, value in numbers(metrics):
            sums[key] = sums.get(key, 0.0) + value * num_examples
            weights[key] = weights.get(key, 0) + num_examples
            if key in PRIVACY_METRICS:
                most[key] = max(most.get(key, value), value)
    averaged: dict[str, Scalar] = {key: sums[key] / weights[key] for key in sums if weights[key] > 0}
    # The privacy spent is every site's own: a round's is its most spent site's, never a mean.
    averaged.update({key: most[key] for key in averaged.keys() & most.keys()})
    return averaged


def robust_reduce(values: list[float], trim: float | None) -> float:
    """The median of `values`, or with `trim` their mean after cutting int(trim x n) from each
    end (FedTrimmedAvg's rule, applied to evaluations)."""
    ordered = sorted(values)
    if trim is None:
        return float(np.median(ordered))
    cut = int(trim * len(ordered))
    kept = ordered[cut : len(ordered) - cut] or ordered
    return float(np.mean(kept))


def robust_average(results: list[tuple[float, Metrics]], trim: float | None) -> tuple[float, dict[str, Scalar]]:
    """(loss, metrics) of evaluations reduced robustly per value, ignoring the example counts: one
    client's claim cannot move a median, however many examples it claims."""
    per_key: dict[str, list[float]] = {}
    for _, metrics in results:
        for key, value in numbers(metrics):
            per_key.setdefault(key, []).append(value)
    loss = robust_reduce([loss for loss, _ in results], trim)
    return loss, {key: robust_reduce(values, trim) for key, values in per_key.items()}
