"""Every STRATEGY builds from the settings and aggregates; bad client updates are refused."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.superlink.fleet.grpc_bidi.grpc_bridge import GrpcBridge

from server.training.aggregate_metrics import weighted_average
from server.training.strategies import build_strategy
from server.transport.wiring import NamedClientProxy
from shared.settings import Settings
from shared.strategy_table import STRATEGIES

GLOBAL = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]
ALL_STRATEGIES = tuple(STRATEGIES)


def update(value: float, num_examples: int = 10, arrays: list[np.ndarray] | None = None) -> FitRes:
    arrays = arrays if arrays is not None else [np.full_like(a, value) for a in GLOBAL]
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, {"train_loss": value, "note": "x"})


def proxy(i: int) -> NamedClientProxy:
    return NamedClientProxy(cid=f"cid{i}", bridge=GrpcBridge(), name=f"client-{i}")


def strategy(name: str, **values):
    # 5 clients: enough for Krum with one malicious client and for FedTrimmedAvg to trim one. GLOBAL
    # is all zeros, a model with no size of its own: these tests give the update bounds explicitly
    # (the automatic ones have tests of their own).
    values = {
        "min_fit_clients": 5, "min_available_clients": 5,
        "update_norm_limit": 1000.0, "update_norm_median_multiple": 0.0, **values,
    }  # fmt: skip
    settings = Settings(strategy=name, **values)
    return build_strategy(settings, ndarrays_to_parameters(GLOBAL))


@pytest.mark.parametrize("name", ALL_STRATEGIES)
def test_each_strategy_aggregates_three_updates(name: str) -> None:
    guarded = strategy(name)
    assert type(guarded.inner).__name__.lower() == name
    results = [(proxy(i), update(v)) for i, v in enumerate((1.0, 2.0, 6.0))]
    parameters, metrics = guarded.aggregate_fit(1, results, [])
    arrays = parameters_to_ndarrays(parameters)
    assert [a.shape for a in arrays] == [a.shape for a in GLOBAL]
    assert all(np.isfinite(a).all() for a in arrays)
    assert not np.allclose(arrays[0], 0.0)  # the model moved
    assert metrics["train_loss"] == pytest.approx(3.0)


def test_fedavg_weights_by_examples() -> None:
    results = [(proxy(0), update(1.0, 10)), (proxy(1), update(4.0, 30))]
    parameters, _ = strategy("fedavg").aggregate_fit(1, results, [])
    assert parameters_to_ndarrays(parameters)[0] == pytest.approx(np.full((3, 2), 3.25))


def test_knobs_reach_the_flower_strategy() -> None:
    assert strategy("fedprox", proximal_mu=0.7).inner.proximal_mu == 0.7
    fedadam = strategy("fedadam", server_learning_rate=0.02, beta_1=0.5, tau=0.001).inner
    assert (fedadam.eta, fedadam.beta_1, fedadam.tau) == (0.02, 0.5, 0.001)
    assert strategy("fedavgm").inner.server_learning_rate == 1.0  # empty knob: Flower's own default
    assert strategy("fedtrimmedavg", trim_fraction=0.3).inner.beta == 0.3
    assert strategy("fedavgm", server_momentum=0.5).inner.server_momentum == 0.5
    krum = strategy("krum", krum_malicious_clients=1, krum_clients_to_keep=2).inner
    assert (krum.num_malicious_clients, krum.num_clients_to_keep) == (1, 2)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (update(np.nan), "holds NaN or Inf"),
        (update(np.inf), "holds NaN or Inf"),
        (update(1.0, arrays=GLOBAL[:1]), "has 1 arrays, the model has 2"),
        (
            update(1.0, arrays=[np.zeros((2, 3), np.float32), GLOBAL[1]]),
            "array 0 is float32[2, 3], expected float32[3, 2]",
        ),
        (update(1.0, arrays=[GLOBAL[0].astype(np.float64), GLOBAL[1]]), "array 0 is float64"),
        (update(1.0, num_examples=0), "claims 0 training examples"),
    ],
    ids=["nan", "inf", "too-few-arrays", "wrong-shape", "wrong-dtype", "no-examples"],
)
def test_bad_updates_are_refused_and_the_rest_aggregated(bad: FitRes, reason: str, caplog) -> None:
    guarded = strategy("fedavg")
    results = [(proxy(0), update(2.0)), (proxy(1), bad), (proxy(2), update(4.0))]
    report = guarded.aggregate(1, results, [])
    arrays = parameters_to_ndarrays(report.parameters)
    assert arrays[0] == pytest.approx(np.full((3, 2), 3.0))
    assert [(p.name, r) for p, r in report.refused] == [("client-1", report.refused[0][1])]
    assert reason in report.refused[0][1] and report.reasons == [report.refused[0][1]] and report.failed is None
    assert f"refused the update of client client-1: {report.refused[0][1]}" in caplog.text
    assert not hasattr(guarded, "refused") and not hasattr(guarded, "round_failed")  # the report says it


def test_all_updates_bad_keeps_the_global_model() -> None:
    parameters, _ = strategy("fedavg").aggregate_fit(1, [(proxy(0), update(np.nan))], [])
    assert parameters is None


def test_metrics_average_by_examples_and_skip_what_is_not_a_number() -> None:
    merged = weighted_average([(10, {"acc": 1.0, "name": "a", "flag": True}), (30, {"acc": 0.5, "blob": b"x"})])
    assert merged == {"acc": pytest.approx(0.625)}


def test_counts_far_above_the_median_are_clipped_and_above_the_data_set_refused(caplog) -> None:
    guarded = strategy("fedavg")  # digits: no client can have more than 1,797 examples
    results = [(proxy(i), update(v, n)) for i, (v, n) in enumerate(((1.0, 10), (1.0, 10), (1.0, 10), (9.0, 1500)))]
    parameters, _ = guarded.aggregate_fit(1, results, [])
    assert results[3][1].num_examples == 20  # 2 x the median
    assert "client client-3 claims 1500 training examples, far above the others: counted as 20" in caplog.text
    assert parameters_to_ndarrays(parameters)[0] == pytest.approx(np.full((3, 2), (30 + 180) / 50))
    report = guarded.aggregate(2, [(proxy(0), update(1.0)), (proxy(1), update(1.0, 10**12))], [])
    assert "more than the 1797 the data set can give" in report.refused[0][1]


@pytest.mark.parametrize("honest", [2, 9])
def test_a_liar_weighs_at_most_twice_an_honest_client_of_median_size(honest: int) -> None:
    """Digits split over 3 or 10 clients (479 or 179 examples each): a client claiming the 1,797
    of the whole data set, the most the bounds allow, kept 65% and 53% of FedAvg's weight when
    counts were clipped at 10x the median."""
    size = 1437 // (honest + 1)
    guarded = strategy("fedavg")
    results = [(proxy(i), update(0.0, size)) for i in range(honest)] + [(proxy(honest), update(1.0, 1797))]
    parameters, _ = guarded.aggregate_fit(1, results, [])
    liar_share = float(parameters_to_ndarrays(parameters)[0].flat[0])  # honest 0, liar 1: its weight
    assert liar_share <= 2 / (2 + honest) + 1e-6
    assert results[-1][1].num_examples <= 2 * size


def test_one_certificate_with_many_connections_weighs_at_most_twice_a_median_participant() -> None:
    """The share bound holds per participant: four connections of one certificate, each within
    the per-connection bound, together count at most twice the median honest participant."""
    guarded = strategy("fedavg")
    honest = [(proxy(i), update(0.0, 100)) for i in range(3)]
    attacker = []
    for i in range(3, 7):
        p = proxy(i)
        p.certificate = "mallory"
        attacker.append((p, update(1.0, 200)))
    parameters, _ = guarded.aggregate_fit(1, honest + attacker, [])
    share = float(parameters_to_ndarrays(parameters)[0].flat[0])
    assert share <= 200 / (300 + 200) + 1e-6  # the certificate's total counted as 200 at most
    assert sum(res.num_examples for _, res in attacker) <= 200


def test_updates_that_move_the_model_too_far_are_refused() -> None:
    guarded = strategy("fedavg", update_norm_limit=10.0)
    results = [(proxy(0), update(1.0)), (proxy(1), update(1e30)), (proxy(2), update(5.0))]  # norm 12.2 for 5.0
    report = guarded.aggregate(1, results, [])
    assert [p.name for p, _ in report.refused] == ["client-1", "client-2"]
    assert "more than UPDATE_NORM_LIMIT=10" in report.refused[1][1]


@pytest.mark.parametrize(
    ("loss", "count", "metrics", "reason"),
    [
        (1.0, -240, {"accuracy": 0.5}, "claims -240 test examples"),
        (1.0, 10**12, {"accuracy": 1.0}, "more than the 1797"),
        (float("nan"), 10, {"accuracy": 0.5}, "its loss is nan"),
        (1.0, 10, {"accuracy": 1.5}, "its metric accuracy is 1.5, outside [0, 1]"),
        (1.0, 10, {"accuracy": float("inf")}, "its metric accuracy is inf"),
    ],
)
def test_bad_evaluations_are_refused(loss: float, count: int, metrics: dict, reason: str, caplog) -> None:
    from flwr.common import EvaluateRes

    guarded = strategy("fedavg")
    good = EvaluateRes(Status(Code.OK, ""), 0.5, 100, {"accuracy": 0.8, "shard": "s" * 1000, "extra": b"x"})
    results = [(proxy(0), good), (proxy(1), EvaluateRes(Status(Code.OK, ""), loss, count, metrics))]
    failures: list = []
    loss_avg, merged = guarded.aggregate_evaluate(1, results, failures)
    assert loss_avg == pytest.approx(0.5) and merged["accuracy"] == pytest.approx(0.8)
    assert [p.name for p, _ in results] == ["client-0"] and len(failures) == 1
    assert reason in str(failures[0]) and f"refused the evaluation of client client-1: {failures[0]}" in caplog.text
    assert good.metrics == {"accuracy": 0.8, "shard": "s" * 64 + "..."}  # unknown keys dropped, a name capped


@pytest.mark.parametrize(
    ("values", "rule"),
    [
        ({"strategy": "krum", "min_fit_clients": 3, "krum_malicious_clients": 1}, "MIN_FIT_CLIENTS >= 2*KRUM"),
        ({"strategy": "krum", "min_fit_clients": 2}, "MIN_FIT_CLIENTS >= 2*KRUM_MALICIOUS_CLIENTS+3 = 3"),
        ({"strategy": "fedtrimmedavg", "min_fit_clients": 3, "trim_fraction": 0.2}, "trims nothing"),
        ({"strategy": "bulyan", "min_fit_clients": 5, "krum_malicious_clients": 1}, "MIN_FIT_CLIENTS >= 4*KRUM"),
    ],
)
def test_robust_strategies_that_cannot_defend_are_refused(values: dict, rule: str) -> None:
    from shared.errors import BadInput

    with pytest.raises(BadInput, match=rule.replace("*", r"\*").replace("+", r"\+")):
        Settings(min_available_clients=5, **values)


def test_robust_strategies_at_their_minimum_are_accepted() -> None:
    Settings(strategy="krum", min_fit_clients=5, min_available_clients=5, krum_malicious_clients=1)
    Settings(strategy="fedtrimmedavg", min_fit_clients=5, min_available_clients=5, trim_fraction=0.2)
    Settings(strategy="bulyan", min_fit_clients=7, min_available_clients=7, krum_malicious_clients=1)


def test_bulyan_keeps_one_attacker_of_seven_out() -> None:
    """Bulyan (El Mhamdi et al. 2018, Flower's implementation) with f=1 and n=7 = 4f+3: an update
    of 1,000 among honest ones of 1.0-1.6 leaves no trace in the aggregate."""
    guarded = strategy(
        "bulyan", min_fit_clients=7, min_available_clients=7, krum_malicious_clients=1, update_norm_limit=1e7
    )  # the norm bound off: Bulyan itself is tested
    values = (1.0, 1.1, 1.2, 1.3, 1.4, 1.6, 1000.0)
    report = guarded.aggregate(1, [(proxy(i), update(v)) for i, v in enumerate(values)], [])
    assert report.parameters is not None
    assert 1.0 <= float(parameters_to_ndarrays(report.parameters)[0].flat[0]) <= 1.6


def test_fedmedian_below_three_clients_is_warned_about() -> None:
    from server.training.strategies import weak_strategy_warning

    assert "median of fewer than 3" in weak_strategy_warning(Settings(strategy="fedmedian", min_fit_clients=2))
    assert weak_strategy_warning(Settings(strategy="fedmedian", min_fit_clients=3)) is None
    assert weak_strategy_warning(Settings(strategy="fedavg", min_fit_clients=2)) is None


def test_a_round_below_min_completion_rate_is_not_applied(caplog) -> None:
    """1 of 3 sampled clients answered: the lone update is neither adopted nor fed to FedAdam's moments."""
    guarded = strategy("fedadam", min_fit_clients=2, min_available_clients=3)
    assert guarded.min_completion_rate == 0.5
    report = guarded.aggregate(1, [(proxy(0), update(5.0))], [TimeoutError(), TimeoutError()])
    assert report.parameters is None and report.metrics == {}
    assert "only 1 of 3 sampled clients" in report.failed and "MIN_COMPLETION_RATE=0.5" in caplog.text
    assert guarded.inner.m_t is None  # the server optimizer was not fed


def test_refused_updates_count_against_the_completion_rate() -> None:
    guarded = strategy("fedavg", min_fit_clients=2, min_available_clients=3)
    results = [(proxy(0), update(1.0)), (proxy(1), update(np.nan)), (proxy(2), update(np.inf))]
    report = guarded.aggregate(1, results, [])
    assert report.parameters is None and report.failed is not None and len(report.refused) == 2


def test_a_round_at_min_completion_rate_is_applied() -> None:
    guarded = strategy("fedavg", min_fit_clients=2, min_available_clients=3)
    report = guarded.aggregate(1, [(proxy(0), update(1.0)), (proxy(1), update(3.0))], [TimeoutError()])
    assert report.parameters is not None and report.failed is None
    lenient = strategy("fedavg", min_fit_clients=2, min_available_clients=3, min_completion_rate=0.0)
    assert lenient.aggregate_fit(1, [(proxy(0), update(1.0))], [TimeoutError()] * 5)[0] is not None


def test_server_optimizers_default_to_tuned_settings_not_flowers_legacy_ones() -> None:
    """Flower's legacy FedAdam/FedAdagrad (eta=0.1, tau=1e-9) take sign-like steps; empty knobs now
    mean the defaults chosen by bench/server_opt_sweep.py, with tau=1e-3."""
    tuned_ones = {name: kind.tuned for name, kind in STRATEGIES.items() if kind.tuned}
    assert set(tuned_ones) == {"fedadam", "fedyogi", "fedadagrad"}
    for name, tuned in tuned_ones.items():
        inner = strategy(name).inner
        assert (inner.eta, inner.tau) == (tuned["eta"], tuned["tau"]) and inner.tau == 1e-3
    assert strategy("fedadagrad", server_learning_rate=0.2, tau=1e-6).inner.eta == 0.2  # a set knob wins
    assert strategy("fedadagrad", server_learning_rate=0.2, tau=1e-6).inner.tau == 1e-6


def test_clip_norm_pulls_far_updates_back_to_the_bound_and_keeps_near_ones() -> None:
    guarded = strategy("fedavg", clip_norm=2.0)
    far, near = update(10.0), update(0.1)  # distances sqrt(8)*10 and sqrt(8)*0.1 from the zero model
    guarded.aggregate_fit(1, [(proxy(0), far), (proxy(1), near)], [])
    far_arrays, near_arrays = parameters_to_ndarrays(far.parameters), parameters_to_ndarrays(near.parameters)
    assert np.linalg.norm(np.concatenate([a.ravel() for a in far_arrays])) == pytest.approx(2.0, rel=1e-5)
    assert np.allclose(far_arrays[0], 2.0 / np.sqrt(8)) and far_arrays[0].dtype == np.float32  # same direction
    assert np.allclose(near_arrays[0], 0.1)
    assert strategy("fedavg").clip_norm == 0.0  # off by default


def evaluation(accuracy: float, examples: int = 100, loss: float = 0.5):
    from flwr.common import EvaluateRes

    return EvaluateRes(Status(Code.OK, ""), loss, examples, {"accuracy": accuracy})


def test_a_client_whose_update_was_refused_does_not_count_in_that_rounds_accuracy() -> None:
    """Reproduced: three honest replicas and a client whose updates were refused every round
    (weights of 1e30) but whose evaluations said 0.1: the true 0.986 was reported as 0.7935."""
    guarded = strategy("fedavg", update_norm_limit=10.0)
    honest = [(proxy(i), update(1.0, 100)) for i in range(3)]
    report = guarded.aggregate(1, [*honest, (proxy(3), update(1e30, 100))], [])
    assert [p.name for p, _ in report.refused] == ["client-3"]
    results = [(proxy(i), evaluation(0.95)) for i in range(3)] + [(proxy(3), evaluation(0.1, 1797))]
    _, metrics = guarded.aggregate_evaluate(1, results, [])
    assert metrics["accuracy"] == pytest.approx(0.95)
    assert len(results) == 4 and "refused" in str(results[3][1].metrics["not_counted"])  # listed, flagged
    # the next round, with its update sound, the client counts again
    guarded.aggregate(2, [*honest, (proxy(3), update(1.0, 100))], [])
    _, metrics = guarded.aggregate_evaluate(2, [(proxy(i), evaluation(0.95)) for i in range(4)], [])
    assert metrics["accuracy"] == pytest.approx(0.95)


@pytest.mark.parametrize(("name", "expected"), [("fedmedian", 0.9), ("fedtrimmedavg", 0.9), ("krum", 0.9)])
def test_robust_strategies_aggregate_evaluations_robustly(name: str, expected: float) -> None:
    """A liar claiming accuracy 1.0 (or 0.0) over the most examples the bounds allow cannot move
    a robust strategy's reported accuracy: medians and trimmed means, not weighted means."""
    guarded = strategy(name, trim_fraction=0.2)
    results = [(proxy(i), evaluation(0.9)) for i in range(3)]
    results += [(proxy(3), evaluation(0.0, 1797, loss=50.0)), (proxy(4), evaluation(1.0, 1797, loss=0.0))]
    loss, metrics = guarded.aggregate_evaluate(1, results, [])
    assert metrics["accuracy"] == pytest.approx(expected) and loss == pytest.approx(0.5)
    _, mean = strategy("fedavg").aggregate_evaluate(1, [(p, evaluation(r.metrics["accuracy"], r.num_examples))
                                                        for p, r in results], [])  # fmt: skip
    assert mean["accuracy"] != pytest.approx(expected)  # FedAvg keeps Flower's weighted mean


def test_async_failures_count_by_participant_in_the_completion_rate() -> None:
    """Async mode hands the guard its failures and refusals as exceptions: counted one each, four
    failing connections of one certificate made every version fail MIN_COMPLETION_RATE=0.5 (3
    sound of 7). With their clients attached they count as the one participant they are."""
    from server.training.strategies import ClientFailure, Refused

    guarded = strategy("fedavg", update_norm_limit=10.0, min_completion_rate=0.5)
    sound = [(proxy(i), update(1.0)) for i in range(3)]
    mallory = []
    for i in range(3, 7):
        p = proxy(i)
        p.certificate = "mallory"
        mallory.append(p)
    failures = [ClientFailure(p, RuntimeError("client status FIT_NOT_IMPLEMENTED: nan loss")) for p in mallory[:2]]
    failures += [Refused(p, "array 0 holds NaN or Inf values") for p in mallory[2:]]
    report = guarded.aggregate(1, sound, failures)
    assert report.parameters is not None, report.failed  # 3 sound of 4 participants
    assert "only 3 of 7" not in str(report.failed)


def model(value: float):
    return ndarrays_to_parameters([np.full_like(a, value) for a in GLOBAL])


@pytest.mark.parametrize("evaluates", [True, False], ids=["evaluated-run", "no-evaluations"])
def test_a_roll_back_goes_to_an_evaluated_model_not_one_finite_updates_vouched_for(evaluates: bool) -> None:
    """A wrecked model with huge but finite weights still yields finite updates (an attacker's and
    one honest client's): those once made it the model to roll back to, and a run whose last
    model was unusable ended on the wreck (0.117) with exit 0. In a run that evaluates, only an
    evaluation proves a model sound; without evaluations the updates are all the evidence."""
    values = {} if evaluates else {"fraction_evaluate": 0.0, "min_evaluate_clients": 0}
    guard = strategy("fedavg", **values)
    first, second, wrecked, after = model(1.0), model(2.0), model(1e6), model(1e6 + 1)
    assert guard.check_evaluation(1, 1.0, [], (1, first)) is None  # sets the loss scale
    assert guard.check_evaluation(2, 0.9, [], (2, second)) is None  # sound, by its evaluation
    guard.measure_from(wrecked, 3)
    guard.aggregate(4, [(proxy(i), update(1e6)) for i in range(2)], [])  # 2 finite updates on the wreck
    rolled = guard.check_evaluation(4, 1e7, [], (4, after))
    assert rolled is not None
    parameters, why = rolled
    if evaluates:
        assert parameters is second and why.endswith("rolled back to that of round 2"), why
    else:
        assert parameters is wrecked and why.endswith("rolled back to that of round 3"), why
