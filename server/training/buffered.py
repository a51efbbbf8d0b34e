"""Asynchronous training with buffered aggregation (MODE=async): FedBuff (Nguyen et al.,
AISTATS 2022) with FedAsync's staleness weighting (Xie et al., 2019).

Why: a synchronous round waits for its slowest client, so one client four times slower makes
the whole federation about four times slower. Here every client that is free gets the current
model and its version at once; its update (the difference from the version it trained on) waits
in a buffer, and every BUFFER_SIZE updates the server applies the buffer and the version
advances. A slow client's update arrives some versions later (its staleness s) and counts less,
1/(1+s)^STALENESS_EXPONENT; one staler than MAX_STALENESS is dropped and counted.

How the buffer meets Flower's strategies (a guard around them, not a re-implementation): each
buffered update is first checked and clipped as it was trained (its difference from the version
it was trained on: UPDATE_NORM_MEDIAN_MULTIPLE x the buffer's median raw norm, then CLIP_NORM),
then scaled by its staleness weight s and re-based onto the current model as `current + s *
delta`. FedAvg's example-weighted mean of these is the current model plus the mean of the
weighted updates, and SERVER_LEARNING_RATE (eta_g; empty: 1) scales that step: w + eta_g *
sum(n_i s_i delta_i) / sum(n_i), FedBuff's update (the paper's 1/K mean, here with the bounded
example weights of sync mode), a buffer of stale updates being a smaller step.
FedMedian, FedTrimmedAvg and Krum take the median, trimmed mean or Krum's choice of the weighted
updates; FedAdam, FedYogi, FedAdagrad and FedAvgM take their mean as the pseudo-gradient, with
their moments as in sync mode (their own server step instead of SERVER_LEARNING_RATE's).

Evaluation never stops training: every EVAL_EVERY versions (empty: every ceil(connected clients /
BUFFER_SIZE), so that evaluation costs a client as much per update as in sync rounds: measured
with 3 clients, one 4x slow, evaluating every version took 13 s against 11 s without any
evaluation, 12 versions of 8 epochs) the next clients that come free
evaluate that version (a short call before their next fit), and the result goes into the record
of the version being written when it completes (`eval_version` says which one it measured). The
last version is evaluated on every connected client, as the last round is in sync mode, but a
client still training is waited for at most FINAL_EVAL_TIMEOUT; it gets the final model after
the report (`deliver`).

Threads: Flower's client proxies block until their client answers, so each instruction runs in a
pool thread; this loop (in the main thread, where SIGTERM arrives) only dispatches, collects and
aggregates, waking at least every POLL_SECONDS to see clients that joined or left. A checkpoint is
written at every aggregation, when the buffer has just been applied: a resumed run starts from the
last version with an empty buffer (only the updates still in training or waiting are lost).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from flwr.common import Code, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedProx

from server.reporting.record import RoundRecord
from server.reporting.site_report import client_entries, fmt
from server.training.final_model import hand_out
from server.training.sampling import stable_key
from server.training.strategies import (
    ClientFailure,
    Failures,
    FitReport,
    GuardedStrategy,
    Refused,
    StatusFailure,
    client_label,
    model_verdict,
)
from server.training.update_checks import l2_norm
from server.transport.admission import BoundedClientManager
from server.transport.wiring import Traffic
from shared import protocol
from shared.errors import ClientsTimeout
from shared.protocol import MAX_TEXT, NOT_FINITE, clean_text
from shared.settings import Settings
from shared.strategy_table import STRATEGIES

log = logging.getLogger("flowerpot.server")

POLL_SECONDS = 0.5


@dataclass
class Task:
    """One instruction in flight."""

    proxy: ClientProxy
    kind: Literal["fit", "evaluate"]
    version: int  # the model version it carries


@dataclass
class Update:
    """A sound client update waiting in the buffer."""

    proxy: ClientProxy
    res: FitRes
    delta: list[np.ndarray]  # trained - the version it was trained on
    norm: float  # the delta's L2 norm
    staleness: int
    version: int  # the version it was trained on


@dataclass
class Window:
    """What happened since the last aggregation: the next record's material."""

    started: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)
    buffer: list[Update] = field(default_factory=list)
    # One failure and one refusal per client at most: a client whose fit failed or was refused
    # is held back until the next version (`held`), so a fast bad client can neither flood the
    # log nor outvote the sound updates in MIN_COMPLETION_RATE.
    failures: dict[str, ClientFailure] = field(default_factory=dict)
    refused: dict[str, tuple[ClientProxy, str]] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)
    stale: int = 0


@dataclass
class Evaluation:
    """One version being evaluated by the clients that come free."""

    version: int
    parameters: Parameters
    wanted: int
    asked: set[str] = field(default_factory=set)
    results: list[tuple[ClientProxy, EvaluateRes]] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)

    def wants(self, proxy: ClientProxy) -> bool:
        return proxy.cid not in self.asked and len(self.asked) < self.wanted

    @property
    def answered(self) -> int:
        return len(self.results) + len(self.failures)


@dataclass(frozen=True)
class Evaluated:
    version: int
    loss: float | None
    metrics: dict[str, Scalar]
    results: list[tuple[ClientProxy, EvaluateRes]]
    failures: int
    problems: tuple[str, ...] = ()  # what the failed and refused evaluations said


def staleness_weight(staleness: int, weighting: str, exponent: float) -> float:
    """FedAsync's polynomial weighting 1/(1+s)^a (FedBuff uses a = 0.5), or 1."""
    return 1.0 if weighting == "constant" else 1.0 / (1.0 + staleness) ** exponent


class BufferedRounds:
    """The asynchronous loop: versions `first`..NUM_ROUNDS, each handed to `finish` as a record."""

    def __init__(
        self,
        settings: Settings,
        client_manager: BoundedClientManager,
        guard: GuardedStrategy,
        traffic: Traffic,
        finish: Callable[[RoundRecord, Parameters, list[str]], None],
    ) -> None:
        self.s, self.client_manager, self.guard, self.traffic, self.finish = (
            settings,
            client_manager,
            guard,
            traffic,
            finish,
        )
        self.buffer_size = settings.updates_per_aggregation[0]
        kind = STRATEGIES[settings.strategy]
        # A robust strategy's buffer holds one update per client; FedAvg's may hold several of a
        # fast client (FedBuff's).
        self.one_update_per_client = kind.robust
        lr = settings.server_learning_rate
        self.server_step = 1.0 if kind.own_server_step or lr is None else lr
        self.tasks: dict[Future, Task] = {}
        self.idle_since: dict[str, float] = {}
        self.fits_sent = 0
        self.window = Window()
        self.evaluation: Evaluation | None = None
        # The last version's evaluation on every client: once it starts, nothing trains and every
        # answer is for it.
        self.final: Evaluation | None = None
        self.evaluated: Evaluated | None = None
        self.version = 0
        self.parameters = Parameters(tensors=[], tensor_type="numpy.ndarray")  # the global model, from run()
        self.models: dict[int, list[np.ndarray]] = {}
        self.sent: dict[int, Parameters] = {}  # the same versions, as sent (the guard's sound model)
        # A version found unusable (by the updates trained on it or by its evaluation): (the last
        # sound model, why, that version), applied as the next version by the loop.
        self.rollback: tuple[Parameters, str, int] | None = None
        self.rolled_back: set[int] = set()  # versions replaced: updates trained on them are dropped
        # Per version: how many updates trained on it were finite, and how many NaN or Inf
        # (clients, not updates: a fast client may send several on one version, and one attacker
        # must not vouch for a model many times)
        self.evidence: dict[int, tuple[set[str], set[str]]] = {}
        self.shard_names: dict[str, str] = {}  # per client: its label and the shard its fits said
        self.eval_due_from = 0

    # The loop

    def run(self, parameters: Parameters, first: int) -> Parameters:
        self.version, self.parameters = first - 1, parameters
        self.eval_due_from = self.version  # the version from which the next evaluation is counted
        self.models = {self.version: self.arrays(parameters)}
        self.sent = {self.version: parameters}
        self.traffic.take()
        pool = ThreadPoolExecutor(max_workers=self.s.max_clients + 1, thread_name_prefix="async")
        try:
            while self.version < self.s.num_rounds:
                self.dispatch(pool)
                self.collect(POLL_SECONDS, pool)
                if self.rollback is not None and self.version < self.s.num_rounds:
                    self.roll_back(pool)
                elif self.version < self.s.num_rounds and self.stalled():
                    self.aggregate(pool)  # with what the window has: the guard may fail the version
                self.keep_clients()
            return self.parameters
        finally:
            # Instructions still in flight end with their streams (disconnect, SIGTERM); nothing
            # waits for them here.
            pool.shutdown(wait=False, cancel_futures=True)

    def dispatch(self, pool: ThreadPoolExecutor) -> None:
        """Work for every free client: an evaluation it is wanted for, else the current model to
        train on (up to CONCURRENCY clients training at once; none during the final evaluation)."""
        connected = self.client_manager.all()
        busy = {task.proxy.cid for task in self.tasks.values()}
        free = sorted(
            (p for cid, p in connected.items() if cid not in busy),
            key=lambda p: (self.idle_since.get(p.cid, 0.0), stable_key(p)),  # the longest idle first
        )
        training = sum(1 for task in self.tasks.values() if task.kind == "fit")
        limit = self.s.concurrency or len(connected)
        evaluation = self.open_one
        for proxy in free:
            if evaluation is not None and evaluation.wants(proxy):
                evaluation.asked.add(proxy.cid)
                config = {**self.guard.evaluate_config(evaluation.version), protocol.MODEL_VERSION: evaluation.version}
                ins = EvaluateIns(evaluation.parameters, config)
                self.submit(pool, proxy, "evaluate", evaluation.version, proxy.evaluate, ins)
            elif self.final is None and training < limit and proxy.cid not in self.window.held:
                training += 1
                self.submit(pool, proxy, "fit", self.version, proxy.fit, FitIns(self.parameters, self.fit_config()))

    def stalled(self) -> bool:
        """True when the buffer cannot fill in this version: no fit is in flight and every
        connected client is held back (its fit failed, its update was refused, or, with a robust
        strategy, its update is in the buffer). The version is then made from what there is, so
        that NUM_ROUNDS bounds the run even when no update is ever sound."""
        connected = set(self.client_manager.all())
        training = any(task.kind == "fit" for task in self.tasks.values())
        return bool(connected) and not training and connected <= self.window.held

    def submit(
        self, pool: ThreadPoolExecutor, proxy: ClientProxy, kind: Any, version: int, call: Any, ins: Any
    ) -> None:
        future = pool.submit(call, ins, self.s.round_timeout, version + 1)
        self.tasks[future] = Task(proxy, kind, version)

    def fit_config(self) -> dict[str, Scalar]:
        """The strategy's own fit config for the version this update will help make, plus which
        version it trains on and a number of its own (the Flowerpot client seeds its shuffling
        with it: two fits on one version must not be the same fit)."""
        inner = self.guard.inner
        make = getattr(inner, "on_fit_config_fn", None)
        config: dict[str, Scalar] = dict(make(self.version + 1)) if make else {}
        if isinstance(inner, FedProx):
            config[protocol.PROXIMAL_MU] = inner.proximal_mu
        self.fits_sent += 1
        config.update({protocol.MODEL_VERSION: self.version, protocol.FIT_ID: self.fits_sent})
        return config

    def collect(self, timeout: float, pool: ThreadPoolExecutor) -> None:
        """Handle what finished within `timeout`, one answer at a time: the buffer is applied the
        moment it holds BUFFER_SIZE updates, so it never holds more, and it is empty whenever a
        checkpoint is written."""
        if not self.tasks:
            time.sleep(min(timeout, 0.05))  # no client yet: dispatch soon looks again
            return
        done, _ = wait(list(self.tasks), timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            task = self.tasks.pop(future, None)
            if task is None:  # handled already, by the final evaluation's own collecting
                continue
            self.idle_since[task.proxy.cid] = time.perf_counter()
            try:
                res = future.result()
            except BaseException as exc:  # a client's failure, whatever it is, is counted
                self.failed(task, exc)
                continue
            if res.status.code != Code.OK:
                message = clean_text(res.status.message, MAX_TEXT)
                self.failed(task, StatusFailure(f"client status {res.status.code.name}: {message}"))
            elif task.kind == "fit":
                self.received(task, res)
                full = len(self.window.buffer) >= self.buffer_size
                if full and self.version < self.s.num_rounds and self.rollback is None:
                    self.aggregate(pool)
            else:
                self.evaluation_answer(task, res)

    def failed(self, task: Task, exc: BaseException) -> None:
        label = client_label(task.proxy)
        if task.kind == "fit":
            if self.version < self.s.num_rounds:
                self.window.failures.setdefault(task.proxy.cid, ClientFailure(task.proxy, exc))
                self.window.held.add(task.proxy.cid)
            log.warning("the fit of client %s on version %d failed: %s", label, task.version, _why(exc))
            if NOT_FINITE in str(exc):  # the client's training diverged from that version's model
                self.judge(task.proxy.cid, task.version, finite=False)
            return
        evaluation = self.open_one
        if evaluation is not None and evaluation.version == task.version:
            evaluation.failures.append(exc)
            self.evaluation_progress()
        log.warning("the evaluation of client %s on version %d failed: %s", label, task.version, _why(exc))

    def received(self, task: Task, res: FitRes) -> None:
        """A client's update: checked, then into the buffer as its difference from the version it
        trained on; or dropped as too stale, or refused (the client is then held back until the
        next version)."""
        label = client_label(task.proxy)
        shard = res.metrics.get(protocol.SHARD)
        if isinstance(shard, str):  # the client's own text: cut and cleaned before any log line
            self.shard_names[task.proxy.cid] = f"{label} (shard {clean_text(shard, MAX_TEXT)})"
        if self.version >= self.s.num_rounds:
            log.info("client %s finished training after the last version: its update is not used", label)
            return
        staleness = self.version - task.version
        if task.version in self.rolled_back:
            self.window.stale += 1
            log.warning(
                "dropped the update of client %s: trained on version %d, since rolled back", label, task.version
            )
            return
        if staleness > self.s.max_staleness or task.version not in self.models:
            self.window.stale += 1
            log.warning(
                "dropped the update of client %s: trained on version %d, %d versions ago, more than MAX_STALENESS=%d",
                label, task.version, staleness, self.s.max_staleness,
            )  # fmt: skip
            return
        problem = self.guard.layout_problem(res)
        if problem is None or NOT_FINITE in problem:  # other refusals say nothing of the model
            self.judge(task.proxy.cid, task.version, finite=problem is None)
        delta: list[np.ndarray] = []
        if problem is None:
            base = self.models[task.version]
            delta = [t - b for t, b in zip(self.arrays(res.parameters), base)]
            norm = l2_norm(np.concatenate([d.ravel() for d in delta]))
            log.debug("update norm %.4f (staleness %d)", norm, staleness)
            problem = self.guard.norm_problem(norm)
        if problem is not None:
            self.window.refused.setdefault(task.proxy.cid, (task.proxy, problem))
            self.window.held.add(task.proxy.cid)
            log.warning("version %d: refused the update of client %s: %s", self.version + 1, label, problem)
            return
        self.window.buffer.append(Update(task.proxy, res, delta, norm, staleness, task.version))
        if self.one_update_per_client:
            # The median, trimmed mean and Krum defend against a minority of the updates: one
            # fast client may not fill the buffer with its own.
            self.window.held.add(task.proxy.cid)

    def aggregate(self, pool: ThreadPoolExecutor) -> None:
        """Apply the buffer (BUFFER_SIZE updates, fewer when it cannot fill); the version advances
        (also when the guard finds too few sound ones: the model then stays, as a failed round
        keeps it in sync mode)."""
        window, self.window = self.window, Window()
        version = self.version + 1
        # Staleness against the version the buffer is applied to: a roll-back since an update
        # arrived (a version of its own) made it staler than it was then.
        for update in window.buffer:
            update.staleness = self.version - update.version
        buffer = [u for u in window.buffer if u.staleness <= self.s.max_staleness]
        if len(buffer) < len(window.buffer):
            window.stale += len(window.buffer) - len(buffer)
            log.warning(
                "dropped %d buffered update(s): more than MAX_STALENESS=%d versions old by the time they were applied",
                len(window.buffer) - len(buffer), self.s.max_staleness,
            )  # fmt: skip
        # never more than BUFFER_SIZE: `collect` applies it the moment it is full
        taken, raw_refusals = self.checked_as_trained(version, buffer)
        current = self.models[self.version]
        results = []
        for update in taken:
            weight = staleness_weight(update.staleness, self.s.staleness_weighting, self.s.staleness_exponent)
            rebased = [
                (c + weight * d).astype(ref.dtype) for c, d, ref in zip(current, update.delta, self.guard.reference)
            ]
            update.res.parameters = ndarrays_to_parameters(rebased)
            results.append((update.proxy, update.res))
        self.guard.measure_from(self.parameters, self.version)  # the re-based updates are measured from here
        refusals = [*window.refused.values(), *raw_refusals]
        failures: Failures = [*window.failures.values(), *(Refused(proxy, problem) for proxy, problem in refusals)]
        report = self.guard.aggregate(version, results, failures, trained_on_base=False, checked_as_trained=True)
        refusals = [*refusals, *report.refused]  # every refusal of this version, the guard's (of re-based updates) last
        if report.parameters is not None:
            # a rolled-back model is the last sound one itself, not a step to take from it
            self.parameters = report.parameters if report.rolled_back else self.step(current, report.parameters)
        self.advance(pool, window, taken, report, [problem for _, problem in refusals])

    def checked_as_trained(
        self, version: int, buffer: list[Update]
    ) -> tuple[list[Update], list[tuple[ClientProxy, str]]]:
        """The buffer's updates within the median bound of their raw norms, each clipped to
        CLIP_NORM, and the refused ones: checked as they were trained, before any staleness
        weight shrinks them (a stale update scaled down must neither pass a bound it breaks nor
        be clipped by less than a fresh one)."""
        refused: list[tuple[ClientProxy, str]] = []
        kept = self.guard.within_median(refused, version, [(u.proxy, u.res) for u in buffer], [u.norm for u in buffer])
        sound = {id(res) for _, res in kept}
        taken = [u for u in buffer if id(u.res) in sound]
        bound = self.s.clip_norm
        for update in taken:
            if bound > 0 and update.norm > bound:
                update.delta = [d * (bound / update.norm) for d in update.delta]
                update.norm = bound
        return taken, refused

    def judge(self, client: str, version: int, finite: bool) -> None:
        """A client's update trained on `version` was finite, or NaN or Inf (any other refusal
        says nothing of the model): the guard's verdict (model_verdict, over clients) vouches for
        that version (a proof only in a run without evaluations), or rolls the model back from
        it. Not once the last version exists: a roll-back could no longer be applied."""
        late = self.version >= self.s.num_rounds or self.final is not None
        if late or version in self.rolled_back or version not in self.sent or self.rollback is not None:
            return
        sound, broken = self.evidence.setdefault(version, (set(), set()))
        (sound if finite else broken).add(client)
        (broken if finite else sound).discard(client)
        verdict = model_verdict(len(sound), len(broken), self.client_manager.num_available())
        if verdict is True:
            self.guard.mark_sound(version, self.sent[version], from_updates=True)
        elif verdict is False and self.guard.can_roll_back(version, self.sent[version]):
            why = f"{len(broken)} of the {len(sound) + len(broken)} clients that trained on it sent {NOT_FINITE}"
            parameters, failed = self.guard.roll_back(version, why, (version, self.sent[version]), "version")
            self.rollback = (parameters, failed, version)

    def roll_back(self, pool: ThreadPoolExecutor) -> None:
        """The next version is the last sound model, in place of one found unusable (`judge`,
        `close_evaluation`): the updates trained on that version or later are dropped (as stale),
        the others stay in the buffer."""
        assert self.rollback is not None
        parameters, why, unusable = self.rollback
        self.rollback = None
        window, self.window = self.window, Window()
        self.window.buffer = [u for u in window.buffer if u.version < unusable]
        window.stale += len(window.buffer) - len(self.window.buffer)
        # every version from the unusable one on, also those no fit holds any more
        self.rolled_back.update(range(unusable, self.version + 1))
        if self.evaluation is not None and self.evaluation.version >= unusable:
            self.evaluation = None  # its answers would measure a model given up
        self.parameters = parameters
        self.advance(pool, window, [], FitReport(parameters, {}, [], why, rolled_back=True), [])

    def advance(
        self, pool: ThreadPoolExecutor, window: Window, taken: list[Update], report: FitReport, refusals: list[str]
    ) -> None:
        """The next version, self.parameters, made from `window`: kept, evaluated when due, recorded."""
        version = self.version + 1
        self.version = version
        aggregated = time.perf_counter()
        self.models[version], self.sent[version] = self.arrays(self.parameters), self.parameters
        # Only the versions that fits still in flight were sent: their updates are deltas from them.
        needed = {version, *(task.version for task in self.tasks.values() if task.kind == "fit")}
        for old in [v for v in self.models if v not in needed or v in self.rolled_back]:
            del self.models[old], self.sent[old]
            self.evidence.pop(old, None)
        if version == self.s.num_rounds:
            final = self.final_evaluation(pool)
            evaluated: Evaluated | None = final
            found = self.guard.check_evaluation(
                version, final.loss, list(final.problems), (version, self.parameters), "version"
            )
            if found is not None:  # the run ends with the last sound model, as a sync run's last round does
                self.parameters, failed = found
                report = replace(report, failed=failed if report.failed is None else f"{report.failed}; {failed}")
        else:
            if version - self.eval_due_from >= self.eval_every():
                self.eval_due_from = version
                self.open_evaluation(version)  # may close the open one first
            evaluated, self.evaluated = self.evaluated, None
        record = self.record(version, window, taken, report, len(refusals), evaluated, aggregated - window.started)
        self.finish(record, self.parameters, refusals)

    def eval_every(self) -> int:
        """EVAL_EVERY, or (empty) the versions that take as many updates as there are clients
        connected: then async asks each client for one evaluation per N updates, as sync does."""
        connected = max(1, self.client_manager.num_available())
        return self.s.eval_every or max(1, math.ceil(connected / self.buffer_size))

    def step(self, current: list[np.ndarray], aggregate: Parameters) -> Parameters:
        """SERVER_LEARNING_RATE on the strategies without a server optimizer of their own."""
        if self.server_step == 1.0:
            return aggregate
        ref = self.guard.reference
        arrays = self.arrays(aggregate)
        return ndarrays_to_parameters(
            [(c + self.server_step * (a - c)).astype(r.dtype) for c, a, r in zip(current, arrays, ref)]
        )

    def arrays(self, parameters: Parameters) -> list[np.ndarray]:
        """The model's arrays in float64, shaped (updates are summed in full precision)."""
        layouts = self.guard.reference
        return [ref.view(t).astype(np.float64).reshape(ref.shape) for t, ref in zip(parameters.tensors, layouts)]

    # Evaluation

    def open_evaluation(self, version: int) -> None:
        """The next clients that come free evaluate `version`: MIN_EVALUATE_CLIENTS or
        FRACTION_EVALUATE of those connected, whichever is more (none with both 0).

        An evaluation still open when the next one is due closes with the answers it has when
        they are at least MIN_EVALUATE_CLIENTS (at least 1, at most those it asked for), and the
        newer version is evaluated; otherwise the newer version is not evaluated. So a slow
        client never holds evaluation up, and intermediate evaluations measure the shards of
        the clients that came free first; the final one measures every shard."""
        connected = self.client_manager.num_available()
        wanted = min(connected, max(self.s.min_evaluate_clients, math.ceil(self.s.fraction_evaluate * connected)))
        if self.evaluation is not None:
            open_one = self.evaluation
            enough = min(open_one.wanted, max(1, self.s.min_evaluate_clients))
            asking = any(task.kind == "evaluate" for task in self.tasks.values())
            exhausted = not asking and not set(self.client_manager.all()) - open_one.asked  # the rest left
            if len(open_one.results) < enough and not exhausted:
                log.debug("version %d is not evaluated: version %d still is", version, open_one.version)
                return
            self.close_evaluation()
        if wanted > 0:
            self.evaluation = Evaluation(version, self.parameters, wanted)

    @property
    def open_one(self) -> Evaluation | None:
        """The evaluation that free clients are asked for and answers go to: the final one once
        it has started."""
        return self.final or self.evaluation

    def evaluation_answer(self, task: Task, res: EvaluateRes) -> None:
        evaluation = self.open_one
        if evaluation is None or evaluation.version != task.version:
            return  # an evaluation that gave way to a newer one
        evaluation.results.append((task.proxy, res))
        self.evaluation_progress()

    def evaluation_progress(self) -> None:
        if self.final is None and self.evaluation is not None and self.evaluation.answered >= self.evaluation.wanted:
            self.close_evaluation()

    def close_evaluation(self) -> None:
        evaluation, self.evaluation = self.evaluation, None
        if evaluation is not None and evaluation.answered:
            evaluated = self.evaluated = self.aggregate_evaluation(evaluation)
            log.info(evaluation_line(evaluated))
            if evaluated.version in self.rolled_back or self.rollback is not None:
                return  # its model (or an older one) was found unusable already: it sets no scale
            found = self.guard.check_evaluation(
                evaluated.version, evaluated.loss, list(evaluated.problems), (evaluated.version, evaluation.parameters),
                "version",
            )  # fmt: skip
            if found is not None:
                self.rollback = (*found, evaluated.version)

    def aggregate_evaluation(self, evaluation: Evaluation) -> Evaluated:
        results, failures = list(evaluation.results), list(evaluation.failures)
        loss, metrics = self.guard.aggregate_evaluate(evaluation.version, results, failures)  # type: ignore[arg-type]
        problems = tuple(str(f) for f in failures)
        return Evaluated(evaluation.version, loss, metrics, results, len(failures), problems)

    def final_evaluation(self, pool: ThreadPoolExecutor) -> Evaluated:
        """The final model on every connected client, each as soon as it is free, within
        ROUND_TIMEOUT; a client still training (its update is not used) is waited for at most
        FINAL_EVAL_TIMEOUT, so that one straggler does not hold the run's report. Those left out
        are named here and get the final model afterwards (`deliver`)."""
        self.evaluation = None
        final = self.final = Evaluation(self.version, self.parameters, wanted=self.client_manager.num_available())
        started = time.monotonic()
        deadline, report_by = started + self.s.round_timeout, started + self.s.final_eval_timeout
        while time.monotonic() < deadline:
            proxies = self.client_manager.all()
            connected = set(proxies)
            final.wanted = len(final.asked | connected)
            self.dispatch(pool)
            asked_open = any(t.kind == "evaluate" for t in self.tasks.values())
            if final.answered >= final.wanted and not asked_open:
                break
            if not connected - final.asked and not asked_open:
                break  # every client asked has answered or left
            if time.monotonic() >= report_by and not asked_open:
                left_out = sorted(self.named(proxies[cid]) for cid in connected - final.asked)
                log.warning(
                    "the final evaluation leaves out %d client(s) busy after FINAL_EVAL_TIMEOUT=%g s: %s; "
                    "they get the final model when they are free", len(left_out), self.s.final_eval_timeout,
                    ", ".join(left_out),
                )  # fmt: skip
                break
            self.collect(POLL_SECONDS, pool)
        return self.aggregate_evaluation(final)

    def named(self, proxy: ClientProxy) -> str:
        return self.shard_names.get(proxy.cid) or client_label(proxy)

    def deliver(self) -> None:
        """The final model to every client the final evaluation did not wait for, once its fit
        ends (within ROUND_TIMEOUT): what a client keeps for predict."""
        final = self.final
        if final is None:
            return
        left_out = set(self.client_manager.all()) - final.asked
        # their streams take one instruction at a time: the fit first (its update is not used)
        wait([f for f, task in self.tasks.items() if task.proxy.cid in left_out], timeout=self.s.round_timeout)
        proxies = [p for cid, p in self.client_manager.all().items() if cid in left_out]
        config = {**self.guard.evaluate_config(self.version), protocol.MODEL_VERSION: self.version}
        hand_out(proxies, self.parameters, config, self.s.round_timeout, self.version, label=self.named)

    # Clients

    def keep_clients(self) -> None:
        """With no client connected and none working, wait (REJOIN_TIMEOUT) for one to join."""
        if self.tasks or self.client_manager.num_available() > 0:
            return
        log.warning("no client connected: waiting up to %g s for one", self.client_manager.wait_timeout)
        if not self.client_manager.wait_for(1):
            raise ClientsTimeout(
                f"no client connected within REJOIN_TIMEOUT={self.client_manager.wait_timeout:g} s in async mode "
                f"(version {self.version} of {self.s.num_rounds}): restart clients, or raise REJOIN_TIMEOUT"
            )

    # The record

    def record(
        self,
        version: int,
        window: Window,
        taken: list[Update],
        report: FitReport,
        refused: int,
        evaluated: Evaluated | None,
        until_aggregated: float,
    ) -> RoundRecord:
        """`refused`: every update refused in this version (on arrival and by the guard)."""
        metrics = report.metrics
        staleness = [u.staleness for u in taken]
        sent, received = self.traffic.take()
        seconds = time.perf_counter() - window.started
        eval_results = evaluated.results if evaluated else []
        return RoundRecord(
            round=version,
            clients_trained=len(taken) - len(report.refused),
            clients_failed=len(window.failures),  # clients whose fit failed (one count each)
            updates_refused=refused,
            clients_evaluated=len(eval_results),
            eval_failures=evaluated.failures if evaluated else 0,
            train_loss=_float(metrics.get(protocol.TRAIN_LOSS)),
            train_accuracy=_float(metrics.get(protocol.TRAIN_ACCURACY)),
            eval_loss=evaluated.loss if evaluated else None,
            eval_accuracy=_float(evaluated.metrics.get(protocol.ACCURACY)) if evaluated else None,
            seconds=seconds,
            fit_seconds=until_aggregated,  # when the version existed (the final evaluation comes after)
            started_at=window.started_at,
            bytes_sent=sent,
            bytes_received=received,
            model_bytes=sum(len(t) for t in self.parameters.tensors),
            fit_metrics=dict(metrics),
            eval_metrics=dict(evaluated.metrics) if evaluated else {},
            failed=report.failed,
            clients=client_entries([(u.proxy, u.res) for u in taken], eval_results),
            staleness_mean=float(np.mean(staleness)) if staleness else 0.0,
            staleness_max=max(staleness, default=0),
            updates_stale=window.stale,
            eval_version=evaluated.version if evaluated else None,
            clients_connected=self.client_manager.num_available(),
        )


def evaluation_line(evaluated: Evaluated) -> str:
    accuracy = evaluated.metrics.get(protocol.ACCURACY)
    return (
        f"version {evaluated.version} evaluated: loss {fmt(evaluated.loss)}, accuracy {fmt(_float(accuracy))} "
        f"({len(evaluated.results)} clients)"
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _why(exc: BaseException) -> str:
    # A client's failure can carry its own text (a status message): cut and cleaned like all of it.
    return f"{exc.__class__.__name__}: {clean_text(exc, MAX_TEXT)}" if str(exc) else exc.__class__.__name__
