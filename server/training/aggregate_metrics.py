"""Aggregation of the metrics clients report; metrics the server does not know never break it."""

from __future__ import annotations

from numbers import Real

from flwr.common import Metrics, Scalar


def weighted_average(results: list[tuple[int, Metrics]]) -> dict[str, Scalar]:
    """Average each numeric metric weighted by example counts; text and bytes are skipped here
    (they stay in the per-client records of the history)."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for num_examples, metrics in results:
        for key, value in metrics.items():
            if isinstance(value, Real) and not isinstance(value, bool):
                sums[key] = sums.get(key, 0.0) + float(value) * num_examples
                weights[key] = weights.get(key, 0) + num_examples
    return {key: sums[key] / weights[key] for key in sums if weights[key] > 0}
