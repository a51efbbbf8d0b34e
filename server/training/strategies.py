"""Flower strategies built from the settings, behind a guard that checks every client update."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
)
from flwr.server import strategy as flwr_strategies
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from server.training.aggregate_metrics import weighted_average
from server.training.update_checks import (
    UpdateDistance,
    clean_metrics,
    count_problem,
    example_limit,
    known_metrics,
    l2_norm,
    loss_problem,
    median_bound,
)
from shared import protocol
from shared.modelfile import npy_view
from shared.protocol import EVALUATE_METRICS, FIT_METRICS
from shared.settings import Settings
from shared.strategy_table import STRATEGIES

log = logging.getLogger("flowerpot.server")

FitResults = list[tuple[ClientProxy, FitRes]]
Failures = list[tuple[ClientProxy, FitRes] | BaseException]


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
        return {protocol.SERVER_ROUND: server_round, protocol.NUM_ROUNDS: s.num_rounds}

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
        min_completion_rate=s.min_completion_rate,
        clip_norm=s.clip_norm,
        known_metrics=known_metrics(task_metrics or {}),
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

    @property
    def reasons(self) -> list[str]:
        return [problem for _, problem in self.refused]


class GuardedStrategy(Strategy):
    """Delegates to a Flower strategy, with these additions.

    - Updates with the wrong number of arrays, wrong shapes or dtypes, NaN/Inf values, no
      examples or more than the data set holds, or further than UPDATE_NORM_LIMIT from the global
      model are refused, logged, and counted as failures; the round aggregates the rest.
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
        norm_limit: float = math.inf,
        min_completion_rate: float = 0.0,
        clip_norm: float = 0.0,
        known_metrics: tuple[dict[str, str], dict[str, str]] = (FIT_METRICS, EVALUATE_METRICS),
    ) -> None:
        self.clip_norm = clip_norm
        self.fit_metrics, self.evaluate_metrics = known_metrics  # what a client's answer may report
        self.inner, self.num_rounds, self.evaluate_config = inner, num_rounds, evaluate_config
        self.min_completion_rate = min_completion_rate
        self.max_examples, self.norm_limit = max_examples, norm_limit
        self.reference = [TensorLayout.of(t) for t in initial.tensors]
        self.distance = UpdateDistance()
        self.distance.set_global([ref.view(t) for t, ref in zip(initial.tensors, self.reference)])
        self.warned: set[str] = set()  # clients already told about dropped metrics

    def __repr__(self) -> str:
        return f"Guarded({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        if all(ref.fits(t) for t, ref in zip(parameters.tensors, self.reference)):
            self.distance.set_global([ref.view(t) for t, ref in zip(parameters.tensors, self.reference)])
        _tell_round(client_manager, server_round, "fit")
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Flower's interface; the loops call `aggregate`, which also says what it refused."""
        report = self.aggregate(server_round, results, failures)
        return report.parameters, report.metrics

    def aggregate(self, server_round: int, results: FitResults, failures: Failures) -> FitReport:
        """The sound updates aggregated by the Flower strategy; the others refused (as failures to
        it), and the round failed when too few are sound."""
        refused: list[tuple[ClientProxy, str]] = []
        sound: FitResults = []
        for proxy, res in results:
            bad_metric = self.keep_known_metrics(proxy, res, self.fit_metrics)  # always: the history keeps them
            problem = self.problem(res) or bad_metric
            if problem is None:
                sound.append((proxy, res))
            else:
                refused.append((proxy, problem))
                log.warning("round %d: refused the update of client %s: %s", server_round, client_label(proxy), problem)
        completed, sampled = completed_participants(sound, results, failures)
        failed = self.too_few(completed, sampled, len(results) + len(failures))
        if failed is not None:
            # The model stays and a server optimizer's moments are not fed with a lone update.
            log.warning("round %d failed, its result is not applied: %s", server_round, failed)
            return FitReport(None, {}, refused, failed)
        self.clip_counts(server_round, sound, "training")
        if self.clip_norm > 0:
            self.clip_updates(sound)
        sound.sort(key=_stable_order)
        as_failures = [ValueError(problem) for _, problem in refused]
        parameters, metrics = self.inner.aggregate_fit(server_round, sound, [*failures, *as_failures])
        return FitReport(self.as_reference_dtypes(parameters) if parameters is not None else None, metrics, refused)

    def clip_updates(self, results: FitResults) -> None:
        """CLIP_NORM: an update further than it from the global model is pulled back along its own
        direction to that distance (vectorized over all arrays at once; only when set)."""
        center = self.distance.flat
        assert center is not None
        for _, res in results:
            tensors = res.parameters.tensors
            flat = np.concatenate([ref.view(t).astype(np.float64).ravel() for t, ref in zip(tensors, self.reference)])
            delta = flat - center
            norm = l2_norm(delta)
            if norm <= self.clip_norm:
                continue
            clipped = center + delta * (self.clip_norm / norm)
            sizes = np.cumsum([int(np.prod(ref.shape)) for ref in self.reference])[:-1]
            arrays = [
                part.reshape(ref.shape).astype(ref.dtype) for part, ref in zip(np.split(clipped, sizes), self.reference)
            ]
            res.parameters = ndarrays_to_parameters(arrays)

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

    def problem(self, res: FitRes) -> str | None:
        """Why a client update cannot be aggregated, or None when it can."""
        layout = self.layout_problem(res)
        if layout is not None:
            return layout
        distance = self.distance.of([ref.view(t) for t, ref in zip(res.parameters.tensors, self.reference)])
        log.debug("update norm %.4f", distance)
        return self.norm_problem(distance)

    def norm_problem(self, distance: float) -> str | None:
        if not distance <= self.norm_limit:
            return f"it moves the model by {distance:.4g} (L2 norm), more than UPDATE_NORM_LIMIT={self.norm_limit:g}"
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
        """No client weighs more than MEDIAN_MULTIPLE x the round's median count."""
        bound = median_bound([res.num_examples for _, res in results])
        for proxy, res in results:
            if bound is not None and res.num_examples > bound:
                log.warning(
                    "round %d: client %s claims %d %s examples, far above the others: counted as %d",
                    server_round, client_label(proxy), res.num_examples, phase, bound,
                )  # fmt: skip
                res.num_examples = bound

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        _tell_round(client_manager, server_round, "evaluate")
        instructions = self.inner.configure_evaluate(server_round, parameters, client_manager)
        if server_round != self.num_rounds:
            return instructions
        # The last round evaluates on every connected client, also with FRACTION_EVALUATE=0 (when
        # Flower's strategies give no instructions at all): the run's final accuracy covers all
        # shards, and every client keeps the final model.
        ins = instructions[0][1] if instructions else EvaluateIns(parameters, self.evaluate_config(server_round))
        return [(proxy, ins) for proxy in client_manager.all().values()]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Refused results leave `results` for `failures` in place: Flower returns these very
        lists to the round, which counts them."""
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
        if not sound:
            return None, {}
        self.clip_counts(server_round, sound, "test")
        return self.inner.aggregate_evaluate(server_round, sorted(sound, key=_stable_order), failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.inner.evaluate(server_round, parameters)


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
    lone = sum(1 for f in failures if not isinstance(f, tuple))
    return len({participant_of(p) for p, _ in sound}), len(sampled) + lone


# Server-side optimiser state that lives in the Flower strategy between rounds: FedAdam, FedYogi
# and FedAdagrad keep moments (m_t, v_t) and their own full-precision weights, FedAvgM its
# momentum (its weights come back through `initial` when the strategy is built from a checkpoint).
STATE_ATTRIBUTES = ("current_weights", "m_t", "v_t", "momentum_vector")


def strategy_state(strategy: GuardedStrategy) -> dict[str, list[np.ndarray]]:
    state = {name: getattr(strategy.inner, name, None) for name in STATE_ATTRIBUTES}
    return {name: [np.asarray(a) for a in value] for name, value in state.items() if value is not None}


def restore_strategy_state(strategy: GuardedStrategy, state: dict[str, list[np.ndarray]]) -> None:
    for name, arrays in state.items():
        if name in STATE_ATTRIBUTES and hasattr(strategy.inner, name):
            setattr(strategy.inner, name, [a.copy() for a in arrays])
