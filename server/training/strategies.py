"""Flower strategies built from the settings, behind a guard that checks every client update."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    Status,
    ndarrays_to_parameters,
)
from flwr.server import strategy as flwr_strategies
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from server.training.aggregate_metrics import robust_average, weighted_average
from server.training.client_privacy import ClientLevel
from server.training.secure_rounds import Dropout, SecureFit
from server.training.update_checks import (
    LOSS_EXPLOSION,
    NORM_MODEL_MULTIPLE,
    NOT_FINITE,
    UpdateDistance,
    clean_metrics,
    count_problem,
    example_limit,
    known_metrics,
    l2_norm,
    loss_problem,
    median_norm_bound,
    model_norm_limit,
    share_bounds,
)
from shared import protocol
from shared.modelfile import npy_view
from shared.protocol import EVALUATE_METRICS, FIT_METRICS
from shared.settings import Settings
from shared.strategy_table import STRATEGIES

log = logging.getLogger("flowerpot.server")

FitResults = list[tuple[ClientProxy, FitRes]]
Failures = list[tuple[ClientProxy, FitRes] | BaseException]


class Refused(ValueError):
    """A refusal of one client's update, with its client (async mode refuses in its buffer)."""

    def __init__(self, proxy: ClientProxy, problem: str) -> None:
        super().__init__(problem)
        self.proxy = proxy


class StatusFailure(RuntimeError):
    """A client answered with a failing status, saying why (async mode; Flower's sync rounds
    keep the answer itself)."""


class ClientFailure(Exception):
    """One client's failed answer with its client: async mode's counterpart of the (proxy, res)
    failures Flower gives sync rounds."""

    def __init__(self, proxy: ClientProxy, error: BaseException) -> None:
        super().__init__(str(error))
        self.proxy, self.error = proxy, error


def model_verdict(finite: int, not_finite: int, answers: int) -> bool | None:
    """What the updates trained on one global model say of it: sound (True) when most of them
    were finite, from at least 2 clients (1 when only 1 answered); unusable (False) when at least
    2 were NaN or Inf and they outnumber the finite ones (a lone client's failure is its own, and
    one attacker's finite update must not vouch for a model that breaks everybody else's
    training); None when they do not tell."""
    if not_finite >= 2 and not_finite > finite:
        return False
    if finite > not_finite and finite >= min(2, answers):
        return True
    return None


def failure_problems(failures: list[Any]) -> list[str]:
    """What a round's failures say of themselves: the guard's refusals (ValueError), and answers
    that failed saying why (a client whose model diverged reports its NaN loss so)."""
    return (
        [str(f) for f in failures if isinstance(f, ValueError)]
        + [f[1].status.message for f in failures if isinstance(f, tuple) and hasattr(f[1], "status")]
        + [str(f.error) for f in failures if isinstance(f, ClientFailure) and isinstance(f.error, StatusFailure)]
    )


def build_strategy(
    settings: Settings, initial: Parameters, task_metrics: dict[str, str] | None = None
) -> GuardedStrategy:
    """The Flower strategy named by STRATEGY (shared/strategy_table.py), with its knobs; empty
    knobs keep Flower's defaults. `task_metrics`: the METRICS the clients' task declared, kept
    beside the server's own."""
    s = settings

    def fit_config(server_round: int) -> dict[str, Scalar]:
        return {
            protocol.SERVER_ROUND: server_round,
            protocol.NUM_ROUNDS: s.num_rounds,
            protocol.LOCAL_EPOCHS: s.local_epochs,
            protocol.BATCH_SIZE: s.batch_size,
            protocol.LEARNING_RATE: s.learning_rate,
        }

    def evaluate_config(server_round: int) -> dict[str, Scalar]:
        config: dict[str, Scalar] = {
            protocol.SERVER_ROUND: server_round,
            protocol.NUM_ROUNDS: s.num_rounds,
            protocol.EVALUATE_SPLIT: s.evaluate_split,
        }
        if s.local_baseline and server_round == s.num_rounds:
            config[protocol.LOCAL_BASELINE] = True
        return config

    common: dict[str, Any] = {
        "fraction_fit": s.fraction_fit,
        "fraction_evaluate": s.fraction_evaluate,
        "min_fit_clients": s.min_fit_clients,
        "min_evaluate_clients": s.min_evaluate_clients,
        # MIN_AVAILABLE_CLIENTS gates the start (Federation.wait_for_start in server/training/rounds.py);
        # within the run a round goes ahead as soon as MIN_FIT_CLIENTS are there.
        "min_available_clients": s.min_fit_clients,
        "on_fit_config_fn": fit_config,
        "on_evaluate_config_fn": evaluate_config,
        "accept_failures": True,
        "initial_parameters": initial,
        "fit_metrics_aggregation_fn": weighted_average,
        "evaluate_metrics_aggregation_fn": weighted_average,
    }
    kind = STRATEGIES[s.strategy]
    knobs = {k: v for k, v in kind.knobs(s).items() if v is not None}
    inner = getattr(flwr_strategies, kind.flower)(**common, **knobs)
    return GuardedStrategy(
        inner,
        initial,
        s.num_rounds,
        evaluate_config,
        max_examples=example_limit(s),
        norm_limit=s.update_norm_limit,
        norm_median_multiple=s.update_norm_median_multiple,
        min_completion_rate=s.min_completion_rate,
        clip_norm=s.clip_norm,
        known_metrics=known_metrics(task_metrics or {}),
        evaluates=s.fraction_evaluate > 0 or s.min_evaluate_clients > 0,
        client_dp=ClientLevel.from_settings(s),
    )


def weak_strategy_warning(settings: Settings) -> str | None:
    """What the operator should know about a strategy that runs but cannot do its job at this
    client count (the ones that cannot at all are refused by Settings)."""
    return STRATEGIES[settings.strategy].weakness(settings)


@dataclass(frozen=True)
class TensorLayout:
    """The exact .npy header and size of one model array: an update's array fits when its bytes
    start with the same header and have the same length (no parsing needed, every round)."""

    header: bytes
    size: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, tensor: bytes) -> TensorLayout:
        array = npy_view(tensor)
        return cls(tensor[: len(tensor) - array.nbytes], len(tensor), array.shape, array.dtype)

    def fits(self, tensor: bytes) -> bool:
        return len(tensor) == self.size and tensor.startswith(self.header)

    def view(self, tensor: bytes) -> np.ndarray:
        return np.frombuffer(tensor, dtype=self.dtype, offset=len(self.header))


@dataclass
class FitReport:
    """What the guard made of one round's updates (or one async version's buffer)."""

    parameters: Parameters | None  # the aggregate; None when the round failed (the model stays)
    metrics: dict[str, Scalar]
    refused: list[tuple[ClientProxy, str]] = field(default_factory=list)  # the updates refused, and why
    failed: str | None = None  # why the round's result is not applied, or None
    rolled_back: bool = False  # `parameters` is the last sound model, in place of an unusable one

    @property
    def reasons(self) -> list[str]:
        return [problem for _, problem in self.refused]


class GuardedStrategy(Strategy):
    """Delegates to a Flower strategy, with these additions.

    - Updates with the wrong number of arrays, wrong shapes or dtypes, NaN/Inf values, no
      examples or more than the data set holds, or further from the global model than
      UPDATE_NORM_LIMIT (empty: a multiple of the model's own norm) or, with 3 or more sound
      updates, than UPDATE_NORM_MEDIAN_MULTIPLE x their median, are refused, logged, and
      counted as failures; the round aggregates the rest.
    - Evaluate results are checked the same way (count, finite loss and metrics, accuracy in
      [0, 1]); refused ones leave the results and count as evaluate failures.
    - Counts far above the round's median are clipped, and only known metrics are kept
      (server/training/update_checks.py), so that no single client owns an average or bloats the history.
    - The last round evaluates on every connected client, so the final accuracy covers all
      shards and every client receives (and keeps) the final global model.
    - Results are aggregated in a stable order, so that runs with the same SEED agree.
    """

    def __init__(
        self,
        inner: Strategy,
        initial: Parameters,
        num_rounds: int,
        evaluate_config: Callable[[int], dict[str, Scalar]] = lambda _: {},
        max_examples: int = 2**62,
        norm_limit: float | None = math.inf,
        min_completion_rate: float = 0.0,
        clip_norm: float = 0.0,
        known_metrics: tuple[dict[str, str], dict[str, str]] = (FIT_METRICS, EVALUATE_METRICS),
        norm_median_multiple: float = 0.0,
        evaluates: bool = True,
        client_dp: ClientLevel | None = None,
    ) -> None:
        self.clip_norm = clip_norm
        # DP=client: every round's update clipped, averaged with equal weights and noised
        # (server/training/client_privacy.py); `connected`: the clients the round sampled from.
        self.client_dp, self.connected = client_dp, 0
        # Whether the run evaluates between rounds: then only an evaluation proves a model sound.
        # Finite updates are weak evidence: a wrecked model with huge but finite weights still
        # yields finite updates (an attacker's and an honest client's), and rolling back to it
        # kept the wreck. Without evaluations they are all the evidence there is.
        self.evaluates = evaluates
        self.fit_metrics, self.evaluate_metrics = known_metrics  # what a client's answer may report
        self.inner, self.num_rounds, self.evaluate_config = inner, num_rounds, evaluate_config
        self.min_completion_rate = min_completion_rate
        # norm_limit None: the automatic bound, from the global model's own norm (model_norm_limit)
        self.max_examples, self.norm_limit, self.norm_median_multiple = max_examples, norm_limit, norm_median_multiple
        self.reference = [TensorLayout.of(t) for t in initial.tensors]
        self.distance = UpdateDistance()
        self.size = sum(ref.view(t).size for t, ref in zip(initial.tensors, self.reference))
        # The global model updates are measured from, its version, and the last one known sound
        # (updates trained on it were finite, or its evaluation was) with the inner strategy's
        # state of then: a model that proves unusable is replaced by it (`roll_back`).
        self.base, self.base_version = initial, 0
        # The last few sound models, oldest first, the starting model always kept: a model found
        # sound and later found unusable (async evidence comes late) gives way to an older one.
        self.sounds: list[tuple[int, Parameters, dict[str, list[np.ndarray]]]] = [(0, initial, {})]
        self.eval_losses: dict[int, float] = {}  # the loss of each round's (version's) evaluation
        self.evaluated: tuple[int, Parameters] | None = None  # the model the latest evaluation measured
        self.measure_from(initial, 0)
        self.warned: set[str] = set()  # clients already told about dropped metrics
        # (round, clients) whose update that round was refused: their evaluation is not counted
        self.refused_fit: tuple[int, set[str]] = (0, set())

    def __repr__(self) -> str:
        return f"Guarded({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.measure_from(parameters, server_round - 1)
        _tell_round(client_manager, server_round, "fit")
        self.connected = client_manager.num_available()
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def measure_from(self, parameters: Parameters, version: int) -> None:
        """Updates are now measured from this global model (of this round or version)."""
        if all(ref.fits(t) for t, ref in zip(parameters.tensors, self.reference)):
            self.distance.set_global([ref.view(t) for t, ref in zip(parameters.tensors, self.reference)])
            self.base, self.base_version = parameters, version

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Flower's interface; the loops call `aggregate`, which also says what it refused."""
        report = self.aggregate(server_round, results, failures)
        return report.parameters, report.metrics

    def aggregate(
        self,
        server_round: int,
        results: FitResults,
        failures: Failures,
        trained_on_base: bool = True,
        checked_as_trained: bool = False,
    ) -> FitReport:
        """The sound updates aggregated by the Flower strategy; the others refused (as failures to
        it), and the round failed when too few are sound. `trained_on_base`: every result was
        trained on the model updates are measured from (sync rounds), so they judge that model;
        async buffers mix versions, and the loop judges each version itself (`mark_sound`,
        `roll_back`). `checked_as_trained`: the median bound and CLIP_NORM were applied to the
        updates as they were trained, before async weighting (`BufferedRounds.checked_as_trained`),
        so they are not applied again here."""
        refused: list[tuple[ClientProxy, str]] = []
        sound: FitResults = []
        norms: list[float] = []
        finite = 0
        for proxy, res in results:
            bad_metric = self.keep_known_metrics(proxy, res, self.fit_metrics)  # always: the history keeps them
            problem, distance = self.problem_and_distance(res)
            if checked_as_trained and problem is not None and distance is not None:
                problem = None  # a norm bound: the raw update passed it, its weighted one may exceed it
            problem = problem or bad_metric
            finite += distance is not None
            if problem is None and distance is not None:
                sound.append((proxy, res))
                norms.append(distance)
            else:
                self.refuse(refused, server_round, proxy, problem or "")
        if self.client_dp is not None:
            # The median of the others' norms must not decide whether an update counts, nor
            # their verdict which model stays: under DP=client only the noisy average does.
            return self.private_average(server_round, sound, refused, failures)
        if not checked_as_trained:
            sound = self.within_median(refused, server_round, sound, norms)
        if trained_on_base:
            problems = [problem for _, problem in refused] + failure_problems(failures)
            not_finite = sum(NOT_FINITE in p for p in problems)
            verdict = model_verdict(finite, not_finite, len(results) + len(failures))
            if verdict is True:
                self.mark_sound(self.base_version, self.base, from_updates=True)
            elif verdict is False and self.can_roll_back(self.base_version, self.base):
                why = f"{not_finite} of the {finite + not_finite} updates trained on it were {NOT_FINITE}"
                last_sound, rolled = self.roll_back(server_round, why, (self.base_version, self.base))
                return FitReport(last_sound, {}, refused, rolled, rolled_back=True)
        # not after a roll-back: the model was at fault then, not its clients
        # async mode refuses in its buffer too: those clients are as refused as the guard's
        earlier = {f.proxy.cid for f in failures if isinstance(f, Refused)}
        self.refused_fit = (server_round, {proxy.cid for proxy, _ in refused} | earlier)
        completed, sampled = completed_participants(sound, results, failures)
        failed = self.too_few(completed, sampled, len(results) + len(failures))
        if failed is not None:
            # The model stays and a server optimizer's moments are not fed with a lone update.
            return failed_round(server_round, failed, refused)
        self.clip_counts(server_round, sound, "training")
        if self.clip_norm > 0 and not checked_as_trained:
            self.clip_updates(sound)
        sound.sort(key=_stable_order)
        as_failures = [ValueError(problem) for _, problem in refused]
        parameters, metrics = self.inner.aggregate_fit(server_round, sound, [*failures, *as_failures])
        return FitReport(self.as_reference_dtypes(parameters) if parameters is not None else None, metrics, refused)

    def clip_updates(self, results: FitResults, bound: float | None = None) -> None:
        """CLIP_NORM (or `bound`): an update further than it from the global model is pulled back
        along its own direction to that distance (vectorized over all arrays at once)."""
        bound = self.clip_norm if bound is None else bound
        center = self.distance.flat
        assert center is not None
        for _, res in results:
            delta = self.flat(res.parameters) - center
            norm = l2_norm(delta)
            if norm <= bound:
                continue
            res.parameters = self.unflat(center + delta * (bound / norm))

    def flat(self, parameters: Parameters) -> np.ndarray:
        return np.concatenate(
            [ref.view(t).astype(np.float64).ravel() for t, ref in zip(parameters.tensors, self.reference)]
        )

    def unflat(self, flat: np.ndarray) -> Parameters:
        sizes = np.cumsum([int(np.prod(ref.shape)) for ref in self.reference])[:-1]
        arrays = [part.reshape(ref.shape).astype(ref.dtype) for part, ref in zip(np.split(flat, sizes), self.reference)]
        return ndarrays_to_parameters(arrays)

    def private_average(
        self, server_round: int, sound: FitResults, refused: list[tuple[ClientProxy, str]], failures: Failures
    ) -> FitReport:
        """DP=client: the sound updates clipped to DP_CLIP_NORM, averaged by the Flower strategy
        with equal weights, scaled to the expected number sampled and noised. Always applied, no
        sound update too (noise alone): whether a round counts must not depend on one client."""
        dp = self.client_dp
        assert dp is not None and self.distance.flat is not None
        center = self.distance.flat
        self.refused_fit = (server_round, {proxy.cid for proxy, _ in refused})
        self.clip_updates(sound, dp.clip_norm)
        for _, res in sound:
            res.num_examples = 1  # example weights would let a client's count outweigh the clip norm
        sound.sort(key=_stable_order)
        metrics: dict[str, Scalar] = {}
        mean = center
        if sound:
            as_failures = [ValueError(problem) for _, problem in refused]
            parameters, metrics = self.inner.aggregate_fit(server_round, sound, [*failures, *as_failures])
            if parameters is not None:
                mean = self.flat(parameters)
        noised = dp.noised(center, mean, len(sound), self.connected)
        # The run's spend after this round, in the history and the live metrics as it grows.
        metrics = {**metrics, protocol.PRIVACY_EPSILON: dp.epsilon(server_round)}
        return FitReport(self.unflat(noised), metrics, refused)

    def aggregate_secure(self, server_round: int, secure: SecureFit) -> FitReport:
        """SECURE_AGGREGATION: the unmasked mean update applied through the Flower strategy, as
        one answer of weight 1 (FedAvg takes it as it is, a server optimizer steps along it); the
        survivors' metrics averaged with equal weights (their example counts are secret too)."""
        self.refused_fit = (server_round, set())
        if secure.failed is not None:
            return failed_round(server_round, secure.failed)
        for proxy, res in secure.results:
            self.keep_known_metrics(proxy, res, self.fit_metrics)
        completed, sampled = completed_participants(secure.results, secure.results, secure.failures)
        failed = self.too_few(completed, sampled, len(secure.results) + len(secure.failures))
        if failed is not None:
            return failed_round(server_round, failed)
        assert self.distance.flat is not None and secure.delta is not None
        aggregate = self.unflat(self.distance.flat + secure.delta)
        proxy = secure.results[0][0]
        one = FitRes(Status(Code.OK, ""), aggregate, 1, {})
        parameters, _ = self.inner.aggregate_fit(server_round, [(proxy, one)], [])
        if parameters is not None:
            parameters = self.as_reference_dtypes(parameters)  # a server optimizer's float64, back to the model's
        if parameters is None or not self.finite(parameters):
            return failed_round(
                server_round, f"the server strategy's step on the unmasked sum is unusable ({NOT_FINITE})"
            )
        metrics = weighted_average([(1, res.metrics) for _, res in secure.results])
        return FitReport(parameters, metrics, [])

    def too_few(self, sound: int, sampled: int, clients: int | None = None) -> str | None:
        """Why a round in which `sound` of `sampled` participants (certificates, else sites) sent a
        usable update may not be applied, or None; `clients`: the connections sampled."""
        if sound == 0:
            return f"no sound update of {sampled if clients is None else clients} sampled clients"
        if sound < self.min_completion_rate * sampled:
            return (
                f"only {sound} of {sampled} sampled clients (counted by participant: certificate, else site) "
                "sent a sound update, "
                f"below MIN_COMPLETION_RATE={self.min_completion_rate:g}"
            )
        return None

    def as_reference_dtypes(self, parameters: Parameters) -> Parameters:
        """Server optimisers (FedAdam's float64 step size) can widen the dtypes; the global model
        keeps the clients' own (half the bytes on the wire, and the same model files)."""
        if all(ref.fits(t) for t, ref in zip(parameters.tensors, self.reference)):
            return parameters
        arrays = [npy_view(t) for t in parameters.tensors]
        return ndarrays_to_parameters([a.astype(ref.dtype) for a, ref in zip(arrays, self.reference)])

    @staticmethod
    def refuse(refused: list[tuple[ClientProxy, str]], server_round: int, proxy: ClientProxy, problem: str) -> None:
        refused.append((proxy, problem))
        log.warning("round %d: refused the update of client %s: %s", server_round, client_label(proxy), problem)

    def within_median(
        self, refused: list[tuple[ClientProxy, str]], server_round: int, sound: FitResults, norms: list[float]
    ) -> FitResults:
        """The updates within UPDATE_NORM_MEDIAN_MULTIPLE x the round's median norm (all of them
        with fewer than MEDIAN_MIN_REPORTS); the others refused."""
        bound = median_norm_bound(norms, self.norm_median_multiple)
        if bound is None:
            return sound
        kept = []
        for (proxy, res), norm in zip(sound, norms):
            if norm <= bound:
                kept.append((proxy, res))
            else:
                self.refuse(
                    refused, server_round, proxy,
                    f"it moves the model by {norm:.4g} (L2 norm), more than UPDATE_NORM_MEDIAN_MULTIPLE="
                    f"{self.norm_median_multiple:g} x the round's median update norm "
                    f"{bound / self.norm_median_multiple:.4g}",
                )  # fmt: skip
        return kept

    @property
    def initial(self) -> Parameters:
        """The starting model (resumed: the checkpoint's), to tell a run that kept none of its own."""
        return self.sounds[0][1]

    @property
    def best_loss(self) -> float:
        """The lowest evaluation loss kept: the scale LOSS_EXPLOSION is measured against."""
        return min(self.eval_losses.values(), default=math.inf)

    @property
    def sound(self) -> tuple[int, Parameters, dict[str, list[np.ndarray]]]:
        """The last sound model: (its round or version, it, the inner strategy's state of then)."""
        return self.sounds[-1]

    def mark_sound(self, version: int, parameters: Parameters, *, from_updates: bool = False) -> None:
        """This model's evaluation or (`from_updates`) the updates trained on it (model_verdict)
        found it sound: it is the last sound one, a model to roll back to, unless a newer one
        already is. Updates prove nothing in a run that evaluates (`evaluates`)."""
        if from_updates and self.evaluates:
            return
        if version > self.sounds[-1][0]:
            self.sounds.append((version, parameters, strategy_state(self)))
            del self.sounds[1:-SOUND_MODELS_KEPT]

    def can_roll_back(self, version: int, parameters: Parameters) -> bool:
        """Whether there is an older sound model than this unusable one (not the starting model)."""
        return version > self.sounds[0][0] and parameters is not self.sounds[0][1]

    def roll_back(
        self, server_round: int, why: str, unusable: tuple[int, Parameters], unit: str = "round"
    ) -> tuple[Parameters, str]:
        """The last sound global model older than `unusable` (its round or version, and it), with
        the inner strategy's state of then, in place of it, and why the round failed. What was
        learnt from the unusable model and later ones is forgotten: that they were sound, and the
        loss scale their evaluations set."""
        bad_version, bad = unusable
        while len(self.sounds) > 1 and (self.sounds[-1][0] >= bad_version or self.sounds[-1][1] is bad):
            self.sounds.pop()
        self.eval_losses = {v: loss for v, loss in self.eval_losses.items() if v < bad_version}
        version, parameters, state = self.sounds[-1]
        restore_strategy_state(self, state)
        for name in STATE_ATTRIBUTES:
            if name not in state and getattr(self.inner, name, None) is not None:
                setattr(self.inner, name, None)  # a server optimizer's moments start afresh
        if hasattr(self.inner, "current_weights"):  # FedOpt's own copy of the weights: the rolled-back ones
            self.inner.current_weights = [npy_view(t).copy() for t in parameters.tensors]
        failed = f"the global model is unusable ({why}): rolled back to that of {unit} {version}"
        log.warning("%s %d: %s", unit, server_round, failed)
        self.measure_from(parameters, version)
        return parameters, failed

    def check_evaluation(
        self,
        server_round: int,
        loss: float | None,
        refused: list[str],
        evaluated: tuple[int, Parameters] | None = None,
        unit: str = "round",
    ) -> tuple[Parameters, str] | None:
        """After the evaluation of round `server_round`'s model: the last sound model when this
        one is unusable (every evaluation NaN or Inf, or the loss above LOSS_EXPLOSION x the lowest
        sound one so far), else None (and the model is sound when it was evaluated). `evaluated`:
        the version and model that were evaluated (async), else the latest configure_evaluate's."""
        if evaluated is None:
            evaluated, self.evaluated = self.evaluated, None
        if evaluated is None or evaluated[0] != server_round or self.client_dp is not None:
            # DP=client: no roll-back, which would pick the model by the clients' evaluations,
            # outside the noise; one client cannot wreck it (its update is clipped) anyway.
            return None
        why, best = None, self.best_loss
        if loss is None and len(refused) >= 1 and all(NOT_FINITE in p for p in refused):
            why = f"every evaluation of it ({len(refused)}) was {NOT_FINITE}"
        elif loss is not None and math.isfinite(best) and loss > LOSS_EXPLOSION * best:
            why = f"its evaluation loss {loss:.4g} is above {LOSS_EXPLOSION:g} x the run's lowest, {best:.4g}"
        if why is not None and self.can_roll_back(*evaluated):
            return self.roll_back(server_round, why, evaluated, unit)
        if loss is not None and math.isfinite(loss):
            if math.isfinite(best):  # the first evaluation only sets the scale
                self.mark_sound(*evaluated)
            self.eval_losses[server_round] = loss
        return None

    def finite(self, parameters: Parameters) -> bool:
        return all(ref.fits(t) and np.isfinite(ref.view(t)).all() for t, ref in zip(parameters.tensors, self.reference))

    def problem(self, res: FitRes) -> str | None:
        """Why a client update cannot be aggregated, or None when it can."""
        return self.problem_and_distance(res)[0]

    def problem_and_distance(self, res: FitRes) -> tuple[str | None, float | None]:
        """(why a client update cannot be aggregated or None, its distance from the global model
        when it is a finite update of the model's layout)."""
        layout = self.layout_problem(res)
        if layout is not None:
            return layout, None
        distance = self.distance.of([ref.view(t) for t, ref in zip(res.parameters.tensors, self.reference)])
        log.debug("update norm %.4f", distance)
        return self.norm_problem(distance), distance

    def norm_problem(self, distance: float) -> str | None:
        """Above the absolute bound: UPDATE_NORM_LIMIT, or the automatic one from the model's norm."""
        if self.norm_limit is not None:
            limit = self.norm_limit
            if not distance <= limit:
                return f"it moves the model by {distance:.4g} (L2 norm), more than UPDATE_NORM_LIMIT={limit:g}"
            return None
        bound = model_norm_limit(self.distance.model_norm, self.size)
        if not distance <= bound:
            return (
                f"it moves the model by {distance:.4g} (L2 norm), more than {bound:.4g} (UPDATE_NORM_LIMIT empty: "
                f"{NORM_MODEL_MULTIPLE:g} x the global model's own norm, {self.distance.model_norm:.4g})"
            )
        return None

    def layout_problem(self, res: FitRes) -> str | None:
        """Everything `problem` checks but the distance: counts, arrays, shapes, dtypes, finiteness."""
        wrong_count = count_problem(res.num_examples, self.max_examples, "training")
        if wrong_count is not None:
            return wrong_count
        tensors = res.parameters.tensors
        if len(tensors) != len(self.reference):
            return f"it has {len(tensors)} arrays, the model has {len(self.reference)}"
        for i, (tensor, ref) in enumerate(zip(tensors, self.reference)):
            if not ref.fits(tensor):
                try:
                    array = npy_view(tensor)
                except Exception as exc:  # any undecodable payload is the client's fault, not ours
                    return f"array {i} cannot be decoded ({exc.__class__.__name__})"
                return f"array {i} is {array.dtype}{list(array.shape)}, expected {ref.dtype}{list(ref.shape)}"
            if not np.isfinite(ref.view(tensor)).all():
                return f"array {i} holds NaN or Inf values"
        return None

    def keep_known_metrics(self, proxy: ClientProxy, res: FitRes | EvaluateRes, known: dict[str, str]) -> str | None:
        """Replace the answer's metrics by the known ones (so a refused answer is small in the
        history too); warn once per client about dropped keys; a problem with a known one."""
        res.metrics, dropped, problem = clean_metrics(res.metrics, known)
        name = client_label(proxy)
        if dropped and name not in self.warned:
            self.warned.add(name)
            log.warning("dropped metrics of client %s that the server does not know: %s", name, ", ".join(dropped))
        return problem

    def clip_counts(self, server_round: int, results: list, phase: str) -> None:
        """No client, and no participant over its connections, weighs more than MEDIAN_MULTIPLE x
        the round's median (see `share_bounds`)."""
        by_participant: dict[str, list[tuple[ClientProxy, FitRes | EvaluateRes]]] = {}
        for proxy, res in results:
            by_participant.setdefault(participant_of(proxy), []).append((proxy, res))
        bounded = share_bounds({p: [r.num_examples for _, r in answers] for p, answers in by_participant.items()})
        for participant, answers in by_participant.items():
            for (proxy, res), count in zip(answers, bounded[participant]):
                if count < res.num_examples:
                    log.warning(
                        "round %d: client %s claims %d %s examples, far above the others: counted as %d",
                        server_round, client_label(proxy), res.num_examples, phase, count,
                    )  # fmt: skip
                    res.num_examples = count

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        _tell_round(client_manager, server_round, "evaluate")
        self.evaluated = (server_round, parameters)
        instructions = self.inner.configure_evaluate(server_round, parameters, client_manager)
        if server_round != self.num_rounds:
            return instructions
        # The last round evaluates on every connected client, also with FRACTION_EVALUATE=0 (when
        # Flower's strategies give no instructions at all): the run's final accuracy covers all
        # shards, and every client keeps the final model.
        ins = instructions[0][1] if instructions else EvaluateIns(parameters, self.evaluate_config(server_round))
        # A client still busy with a fit its round stopped waiting for (FIT_QUORUM) cannot take
        # it now: it gets the final model when it is free (Federation.deliver_final).
        busy: set[str] = getattr(client_manager, "busy", set())
        return [(proxy, ins) for cid, proxy in client_manager.all().items() if cid not in busy]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Refused results leave `results` for `failures` in place: Flower returns these very
        lists to the round, which counts them."""
        said = failure_problems(failures)  # the clients' own reasons, before the refusals join them
        if said:
            log.warning("round %d: %d evaluation(s) failed, the first saying: %s", server_round, len(failures), said[0])
        sound = []
        for proxy, res in results:
            problem = (
                self.keep_known_metrics(proxy, res, self.evaluate_metrics)
                or count_problem(res.num_examples, self.max_examples, "test")
                or loss_problem(res.loss)
            )
            if problem is None:
                sound.append((proxy, res))
            else:
                label = client_label(proxy)
                log.warning("round %d: refused the evaluation of client %s: %s", server_round, label, problem)
                failures.append(ValueError(problem))
        results[:] = sound
        # A client whose update this round was refused stays listed but is not counted: a liar's
        # evaluation would otherwise move the reported accuracy of a model it had no part in.
        refused_round, refused_cids = self.refused_fit
        if refused_round == server_round and refused_cids:
            for proxy, res in sound:
                if proxy.cid in refused_cids:
                    res.metrics[protocol.NOT_COUNTED] = "its update of this round was refused"
            sound = [(proxy, res) for proxy, res in sound if proxy.cid not in refused_cids]
        if not sound:
            return None, {}
        self.clip_counts(server_round, sound, "test")
        sound.sort(key=_stable_order)
        inner = self.inner
        # A robust strategy reduces evaluations as it reduces updates: FedTrimmedAvg by its
        # trimmed mean, FedMedian, Krum and Bulyan by the median; the others by Flower's weighted mean.
        if isinstance(inner, flwr_strategies.FedTrimmedAvg):
            return robust_average([(res.loss, res.metrics) for _, res in sound], float(inner.beta))
        if isinstance(inner, flwr_strategies.FedMedian | flwr_strategies.Krum | flwr_strategies.Bulyan):
            return robust_average([(res.loss, res.metrics) for _, res in sound], None)
        return inner.aggregate_evaluate(server_round, sound, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.inner.evaluate(server_round, parameters)


def failed_round(server_round: int, why: str, refused: list[tuple[ClientProxy, str]] | None = None) -> FitReport:
    """A round whose result is not applied (the model stays), logged once with why."""
    log.warning("round %d failed, its result is not applied: %s", server_round, why)
    return FitReport(None, {}, refused or [], why)


def _tell_round(client_manager: ClientManager, server_round: int, phase: str) -> None:
    """Flower's strategies call client_manager.sample() without the round: a client manager
    that samples reproducibly (server/transport/admission.py) is told it here, before they do."""
    for_round = getattr(client_manager, "for_round", None)
    if for_round is not None:
        for_round(server_round, phase)


def _stable_order(result: tuple[ClientProxy, FitRes | EvaluateRes]) -> tuple[str, str]:
    """Results arrive in any order, and float sums depend on it: sorting by shard (which
    Flowerpot clients report) makes a rerun, or a resumed run, aggregate exactly the same."""
    proxy, res = result
    return str(res.metrics.get(protocol.SHARD, "")), proxy.cid


def client_label(proxy: ClientProxy) -> str:
    return getattr(proxy, "name", None) or proxy.cid[:8]


def participant_of(proxy: ClientProxy) -> str:
    """The unit of participation: the client certificate under CLIENT_AUTH=certificate, else the
    site the client says it is (server/transport/stream.py); a bare proxy is its own."""
    return str(getattr(proxy, "participant", "") or client_label(proxy))


def completed_participants(sound: FitResults, results: FitResults, failures: Failures) -> tuple[int, int]:
    """(participants with a sound update, participants sampled) of a round: MIN_COMPLETION_RATE
    counts participants, so that one certificate's many failing connections weigh as one. A
    failure without its client (an exception) counts as a participant of its own."""
    sampled = {participant_of(p) for p, _ in results}
    sampled |= {participant_of(f[0]) for f in failures if isinstance(f, tuple)}
    sampled |= {participant_of(f.proxy) for f in failures if isinstance(f, Refused | ClientFailure | Dropout)}
    lone = sum(1 for f in failures if not isinstance(f, tuple | Refused | ClientFailure | Dropout))
    return len({participant_of(p) for p, _ in sound}), len(sampled) + lone


# Server-side optimiser state that lives in the Flower strategy between rounds: FedAdam, FedYogi
# and FedAdagrad keep moments (m_t, v_t) and their own full-precision weights, FedAvgM its
# momentum (its weights come back through `initial` when the strategy is built from a checkpoint).
STATE_ATTRIBUTES = ("current_weights", "m_t", "v_t", "momentum_vector")
# The sound models a guard keeps besides the starting one (each a reference to arrays the run
# held anyway; an older one is only needed when several newer ones prove unusable in turn).
SOUND_MODELS_KEPT = 8


def strategy_state(strategy: GuardedStrategy) -> dict[str, list[np.ndarray]]:
    state = {name: getattr(strategy.inner, name, None) for name in STATE_ATTRIBUTES}
    return {name: [np.asarray(a) for a in value] for name, value in state.items() if value is not None}


def restore_strategy_state(strategy: GuardedStrategy, state: dict[str, list[np.ndarray]]) -> None:
    for name, arrays in state.items():
        if name in STATE_ATTRIBUTES and hasattr(strategy.inner, name):
            setattr(strategy.inner, name, [a.copy() for a in arrays])
