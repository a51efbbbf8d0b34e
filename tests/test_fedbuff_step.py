"""Async mode's aggregation step against FedBuff's formula (Nguyen et al., AISTATS 2022):
w <- w + eta_g * mean_i(s(tau_i) * delta_i), s(tau) = 1/sqrt(1 + tau), with each update checked
and clipped as it was trained, before its staleness weight scales it. The real loop's aggregate,
with a real guard around a real Flower strategy, fed buffers of known updates."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from test_strategies import proxy

from server.training.buffered import BufferedRounds, Update
from server.training.strategies import build_strategy
from server.transport.admission import BoundedClientManager
from server.transport.wiring import Traffic
from shared.settings import Settings

START = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]


def loop(**values: object) -> tuple[BufferedRounds, list]:
    """A BufferedRounds at version 5 of 100 on the all-zero model; the records it finishes."""
    settings_values = {"mode": "async", "min_fit_clients": 3, "min_available_clients": 3, "num_rounds": 100,
                       "update_norm_limit": 1000.0, "update_norm_median_multiple": 0.0, **values}  # fmt: skip
    settings = Settings(**settings_values)
    guard = build_strategy(settings, ndarrays_to_parameters(START))
    records: list = []
    rounds = BufferedRounds(settings, BoundedClientManager(10.0), guard, Traffic(), lambda r, p, x: records.append(r))
    rounds.version, rounds.parameters = 5, ndarrays_to_parameters(START)
    rounds.models = {v: [a.astype(np.float64) for a in START] for v in range(6)}
    rounds.sent = {v: rounds.parameters for v in range(6)}
    return rounds, records


def buffered(staleness: list[int], values: list[float], examples: int = 10) -> list[Update]:
    updates = []
    for i, (tau, value) in enumerate(zip(staleness, values)):
        delta = [np.full(a.shape, value, np.float64) for a in START]
        trained = [(a + d).astype(np.float32) for a, d in zip(START, delta)]
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(trained), examples, {})
        norm = float(np.sqrt(sum(np.square(d).sum() for d in delta)))
        updates.append(Update(proxy(i), res, delta, norm, tau, 5 - tau))
    return updates


def step(rounds: BufferedRounds, updates: list[Update]) -> float:
    """The new global model's (uniform) value after aggregating `updates`."""
    rounds.window.buffer = updates
    with ThreadPoolExecutor(1) as pool:
        rounds.aggregate(pool)
    arrays = rounds.arrays(rounds.parameters)
    values = np.concatenate([a.ravel() for a in arrays])
    assert np.allclose(values, values[0])
    return float(values[0])


@pytest.mark.parametrize("tau", [1, 3, 8])
def test_a_buffer_of_equally_stale_updates_steps_s_tau_times_a_fresh_one(tau: int) -> None:
    fresh = step(loop()[0], buffered([0, 0, 0], [0.1, 0.2, 0.3]))
    stale = step(loop()[0], buffered([tau] * 3, [0.1, 0.2, 0.3]))
    assert fresh == pytest.approx(0.2, rel=1e-5)
    assert stale == pytest.approx(fresh / np.sqrt(1 + tau), rel=1e-5)  # exactly s(tau) smaller


def test_the_step_is_fedbuffs_formula_with_the_server_learning_rate() -> None:
    staleness, values = [0, 1, 3], [0.3, 0.2, 0.1]
    expected = 1.5 * np.mean([v / np.sqrt(1 + t) for t, v in zip(staleness, values)])
    assert step(loop(server_learning_rate=1.5)[0], buffered(staleness, values)) == pytest.approx(expected, rel=1e-5)


def test_clipping_happens_before_the_staleness_weight() -> None:
    """Clipped as trained: an update of norm 10 clipped to 1, then weighted by s(3) = 1/2. Clipping
    the weighted update (norm 5) to 1 would have erased its staleness."""
    per_value = 1 / np.sqrt(8)  # 8 values: norm 1 is a value of 1/sqrt(8) each
    rounds, _ = loop(clip_norm=1.0, min_fit_clients=1, min_available_clients=1, min_evaluate_clients=1)
    assert step(rounds, buffered([3], [10 * per_value])) == pytest.approx(per_value / 2, rel=1e-5)


def test_the_median_bound_judges_the_raw_update_not_the_weighted_one() -> None:
    """Three updates of norms 1, 1 and 3.5 under UPDATE_NORM_MEDIAN_MULTIPLE=2: the far one is
    refused although its staleness (tau = 8, s = 1/3) would shrink it under the bound."""
    per_value = 1 / np.sqrt(8)
    rounds, records = loop(update_norm_median_multiple=2.0)
    updates = buffered([0, 0, 8], [per_value, per_value, 3.5 * per_value])
    assert step(rounds, updates) == pytest.approx(per_value, rel=1e-5)
    assert records[-1].updates_refused == 1 and records[-1].clients_trained == 2


def test_staleness_is_counted_against_the_version_the_update_is_applied_to() -> None:
    """An update that arrived fresh at version 5 and is applied after a version of its own (a
    roll-back to the last sound model makes one) is 1 version stale: weighted s(1), not 1."""
    rounds, _ = loop()
    updates = buffered([0, 0, 0], [0.2, 0.2, 0.2])
    rounds.version = 6  # version 6 came in between
    rounds.models[6], rounds.sent[6] = rounds.models[5], rounds.sent[5]
    assert step(rounds, updates) == pytest.approx(0.2 / np.sqrt(2), rel=1e-5)


def test_an_update_that_became_too_stale_in_the_buffer_is_dropped_and_counted() -> None:
    rounds, records = loop(max_staleness=1)
    rounds.version = 7
    rounds.models[7], rounds.sent[7] = rounds.models[5], rounds.sent[5]
    assert step(rounds, buffered([0, 0, 0], [0.2, 0.2, 0.2])) == 0.0  # 2 versions stale: none applied
    assert records[-1].updates_stale == 3
