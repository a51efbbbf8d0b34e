"""The federated run: wait for clients, get starting weights, play the rounds, record everything.

Uses Flower's `Server` for what a round is (evaluate_round / disconnect_all_clients), and for its
fit phase Flower's `fit_clients` between the guard's configure_fit and aggregate (which says what
it refused), and keeps the loop itself here, so that every wait is bounded, every round is logged
in one line and checkpointed before the next one starts, and the run can start from a checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.common import Code, FitIns, FitRes, GetPropertiesIns, Parameters
from flwr.server import Server
from flwr.server.client_proxy import ClientProxy

from server.reporting.live_metrics import LiveMetrics, write_run_file
from server.reporting.privacy import report_privacy, site_ledgers
from server.reporting.record import RoundRecord
from server.reporting.results import Checkpoint, Results
from server.reporting.site_report import client_entries, clients_line, fmt, report_sites
from server.training.buffered import BufferedRounds
from server.training.client_privacy import ClientLevel
from server.training.final_model import hand_out
from server.training.initial_weights import NoAnswers, agreed_parameters, load_pinned
from server.training.secure_rounds import SecureAggregator
from server.training.strategies import (
    FitReport,
    GuardedStrategy,
    build_strategy,
    client_label,
    failure_problems,
    restore_strategy_state,
    strategy_state,
)
from server.transport.admission import BoundedClientManager
from server.transport.wiring import Traffic
from shared import protocol
from shared.errors import ClientsTimeout, RunFailed
from shared.settings import RETIRED, Settings, retired_problem

log = logging.getLogger("flowerpot.server")

DISCONNECT_TIMEOUT = 10.0
# The settings that make a run what it is (marked on the fields): a checkpoint is resumed only
# when they all match.
RUN_SETTINGS = Settings.names_defining("run")
INITIAL_PARAMETER_TRIES = 3
# A run whose last this many rounds (all of them, when it has fewer) failed did not train: it
# ends with RUN_FAILED, not success. One failed round at the end is a bad round; three in a row
# are a federation that no longer produces a model (every update refused, or rolled back).
FAILED_FINAL_ROUNDS = 3


def announce_completion(client_manager: BoundedClientManager, timeout: float) -> None:
    """The run's final instruction to every connected client: the run completed. Once at the end
    of a run, never per round; a client that does not answer it is told to go all the same."""
    proxies = list(client_manager.all().values())
    if not proxies:
        return
    ins = GetPropertiesIns(config={protocol.RUN_COMPLETED: True})

    def tell(proxy: Any) -> None:
        try:
            proxy.get_properties(ins, timeout, None)
        except Exception as exc:  # a client gone by now misses nothing it could still act on
            log.debug("could not tell %s that the run completed: %s", proxy.cid, exc)

    with ThreadPoolExecutor(max_workers=min(32, len(proxies))) as pool:
        list(pool.map(tell, proxies))


class Federation:
    def __init__(
        self,
        settings: Settings,
        client_manager: BoundedClientManager,
        results: Results,
        traffic: Traffic,
        live: LiveMetrics | None = None,
        task_metrics: Callable[[], dict[str, str]] = dict,
    ) -> None:
        self.settings, self.client_manager, self.results, self.traffic = settings, client_manager, results, traffic
        self.task_metrics = task_metrics  # the METRICS the clients' task declared when they joined
        self.live = live or LiveMetrics(settings.num_rounds)  # without an endpoint: in-memory values only
        self.history: list[RoundRecord] = []
        self.last_evaluated: set[str] = set()  # the clients that evaluated the latest round
        self.secure: SecureAggregator | None = None  # SECURE_AGGREGATION: every round's fit phase

    def run(self) -> list[RoundRecord]:
        s = self.settings
        server = Server(client_manager=self.client_manager)
        completed = False
        try:
            resumed = self.resumable()
            self.live.begin(
                self.results.folder,
                resumed is not None,
                self.fingerprint,
                self.client_manager.num_available,
                write=False,
            )
            self.wait_for_start()
            if resumed is None:  # only now that the clients are there: a run that never starts moves nothing
                self.results.archive_previous()
                write_run_file(self.results.folder, self.live.run_id, self.fingerprint)
            initial = resumed.parameters if resumed else self.initial_parameters()
            self.traffic.limit_to_model(sum(len(t) for t in initial.tensors))  # larger updates: refused unread
            declared = self.task_metrics()
            self.live.watch_task_metrics(declared)
            strategy = build_strategy(s, initial, declared)
            if s.secure_aggregation:
                self.secure = SecureAggregator(s, self.client_manager, strategy.size)
            server.set_strategy(strategy)
            server.parameters = initial
            first = 1
            if resumed:
                restore_strategy_state(strategy, resumed.strategy_state)
                self.history, first = list(resumed.history or []), resumed.round + 1
                log.info("resuming the unfinished run at round %d of %d", first, s.num_rounds)
            else:
                log.info(
                    "starting %d %s of %s with %d clients",
                    s.num_rounds,
                    "rounds" if s.mode == "sync" else f"asynchronous versions (buffer {strategy_buffer(s)})",
                    s.strategy,
                    self.client_manager.num_available(),
                )
            self.live.running(first)

            def finish(record: RoundRecord, parameters: Parameters, refusals: list[str]) -> None:
                self.history.append(record)
                checkpoint = Checkpoint(
                    self.fingerprint, record.round, record.round == s.num_rounds, parameters, strategy_state(strategy)
                )
                # Written before the round is logged and before the next one starts: the
                # checkpoint always holds the last finished round.
                self.results.save_round(record, checkpoint, self.model_meta(record))
                log.info(round_line(record, s.num_rounds))
                log.info(clients_line(record))
                self.live.round_done(record, refusals)

            buffered = (
                BufferedRounds(s, self.client_manager, strategy, self.traffic, finish) if s.mode == "async" else None
            )
            if buffered is not None:
                server.parameters = buffered.run(initial, first)
            else:
                for server_round in range(first, s.num_rounds + 1):
                    record, refusals = self.play_round(server, strategy, server_round)
                    finish(record, server.parameters, refusals)
            self.results.write_history(self.history)
            completed = True
            final = self.history[-1]
            log.info(
                "finished %d %s: final accuracy %s, loss %s over %d clients; results in %s",
                s.num_rounds, "rounds" if s.mode == "sync" else "versions",
                fmt(final.eval_accuracy), fmt(final.eval_loss),
                final.clients_evaluated, self.results.folder,
            )  # fmt: skip
            spent = {(row["site"], row["shard"]): row["epsilon"] for row in site_ledgers(self.history)}
            for line in report_sites(final, self.results.folder, spent):
                log.info(line)
            for line in report_privacy(self.history, self.results.folder, s.dp, ClientLevel.from_settings(s)):
                log.info(line)
            local = (final.eval_metrics or {}).get(protocol.LOCAL_ACCURACY)
            if local is not None:
                log.info(
                    "personalisation (LOCAL_BASELINE): global model %s against each site's local-only model %s, "
                    "on the same test splits (weighted mean over sites)", fmt(final.eval_accuracy), fmt(local),
                )  # fmt: skip
            wrecked = run_failure(self.history, server.parameters, strategy)
            if wrecked is not None:
                completed = False
                raise RunFailed(f"the run FAILED: {wrecked}; its results are in {self.results.folder}")
            # After the report, and only for a run that completed: the final model to the clients
            # the last evaluation did not wait for (async FINAL_EVAL_TIMEOUT, sync FIT_QUORUM).
            if buffered is not None:
                buffered.deliver()
            elif any(record.updates_late for record in self.history):
                self.deliver_final(strategy, server.parameters)
        finally:  # also when the run fails: connected clients are told to go, not left waiting
            self.live.end(completed)
            if completed:  # before they go: what lets a client tell a completed run from a failed one
                announce_completion(self.client_manager, DISCONNECT_TIMEOUT)
            server.disconnect_all_clients(timeout=DISCONNECT_TIMEOUT)
            if self.history and self.history[-1].round < s.num_rounds:  # an unfinished run's history too
                self.results.write_history(self.history)
        return self.history

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The run-defining settings that apply (BUFFER_SIZE does not define a sync run)."""
        return self.settings.fingerprint(tuple(n for n in RUN_SETTINGS if self.settings.applies(n)))

    def resumable(self) -> Checkpoint | None:
        """The checkpoint of an unfinished run with the same settings; otherwise None: a new run
        starts, and run() moves the earlier one's results aside once its clients are there."""
        checkpoint = self.results.load_checkpoint()
        changed = changed_settings(checkpoint.run, self.fingerprint) if checkpoint is not None else []
        if checkpoint is not None and not checkpoint.finished and not changed:
            history = self.results.resume_history(checkpoint)
            if history is not None:
                checkpoint.history = history
                return checkpoint
        elif checkpoint is not None and not checkpoint.finished:
            log.warning(
                "not resuming the unfinished run in %s: settings changed (%s)", self.results.folder, ", ".join(changed)
            )
        return None

    def wait_for_start(self) -> None:
        s = self.settings
        log.info("waiting up to %g s for MIN_AVAILABLE_CLIENTS=%d clients", s.start_timeout, s.min_available_clients)
        if not self.client_manager.wait_for(s.min_available_clients, timeout=s.start_timeout):
            raise ClientsTimeout(
                f"only {self.client_manager.num_available()} of MIN_AVAILABLE_CLIENTS={s.min_available_clients} "
                f"clients connected within START_TIMEOUT={s.start_timeout:g} s: start more clients, "
                "or lower MIN_AVAILABLE_CLIENTS"
            )

    def initial_parameters(self) -> Parameters:
        """Pinned (INITIAL_MODEL), or agreed by the first clients; never from one unverified client."""
        s = self.settings
        if s.initial_model is not None:
            parameters = load_pinned(s.initial_model, s.task_name)
            log.info("initial parameters from INITIAL_MODEL=%s", s.initial_model)
            return parameters
        asked = max(2, s.min_available_clients)
        for _ in range(INITIAL_PARAMETER_TRIES - 1):
            try:
                return agreed_parameters(self.client_manager, asked, s.round_timeout, s.max_message_mb)
            except NoAnswers:  # all asked left: ask those that are (back) there, after a bounded wait
                self.client_manager.wait_for(s.min_available_clients)
        return agreed_parameters(self.client_manager, asked, s.round_timeout, s.max_message_mb)

    def play_round(self, server: Server, strategy: GuardedStrategy, server_round: int) -> tuple[RoundRecord, list[str]]:
        """The round's record, and why each refused update was refused."""
        started, started_at = time.perf_counter(), time.time()
        connected = self.client_manager.num_available()
        self.traffic.take()
        report = FitReport(None, {})
        fit_results: list = []
        fit_failures: list = []
        late = 0
        instructions = strategy.configure_fit(server_round, server.parameters, self.client_manager)
        if instructions and self.secure is not None:  # the clients' updates, masked: only their sum
            secure = self.secure.fit(server_round, instructions)
            fit_results, fit_failures = secure.results, list(secure.failures)
            report = strategy.aggregate_secure(server_round, secure)
        elif instructions:  # Flower's Server.fit_round, with the guard's report kept
            fit_results, fit_failures, late = self.fit_first(instructions, server_round, started)
            report = strategy.aggregate(server_round, fit_results, fit_failures)
        elif strategy.client_dp is not None:  # Poisson picked nobody: the round is noise alone, and counted
            report = strategy.aggregate(server_round, [], [])
        if report.parameters is not None:
            server.parameters = report.parameters
        fit_seconds = time.perf_counter() - started
        fit_metrics: dict[str, Any] = report.metrics
        evaluation = server.evaluate_round(server_round=server_round, timeout=self.settings.round_timeout)
        eval_loss: float | None = None
        eval_metrics: dict[str, Any] = {}
        eval_results: list = []
        eval_failures: list = []
        if evaluation is not None:
            eval_loss, eval_metrics, (eval_results, eval_failures) = evaluation
        self.last_evaluated = {proxy.cid for proxy, _ in eval_results}
        rolled_back = strategy.check_evaluation(server_round, eval_loss, failure_problems(eval_failures))
        if rolled_back is not None:
            server.parameters, failed = rolled_back
            # a fit-phase failure stays in the record beside the evaluation's roll-back
            report = replace(report, failed=failed if report.failed is None else f"{report.failed}; {failed}")
        refused = len(report.refused)
        sent, received = self.traffic.take()
        record = RoundRecord(
            round=server_round,
            clients_trained=len(fit_results) - refused,
            clients_failed=len(fit_failures),
            updates_refused=refused,
            clients_evaluated=len(eval_results),
            eval_failures=len(eval_failures),
            train_loss=fit_metrics.get(protocol.TRAIN_LOSS),
            train_accuracy=fit_metrics.get(protocol.TRAIN_ACCURACY),
            eval_loss=eval_loss,
            eval_accuracy=eval_metrics.get(protocol.ACCURACY),
            seconds=time.perf_counter() - started,
            fit_seconds=fit_seconds,
            started_at=started_at,
            bytes_sent=sent,
            bytes_received=received,
            model_bytes=sum(len(t) for t in server.parameters.tensors),
            fit_metrics=fit_metrics,
            eval_metrics=eval_metrics,
            failed=report.failed,
            clients=client_entries(fit_results, eval_results),
            updates_late=late or None,
            clients_connected=connected,
        )
        return record, report.reasons

    def deliver_final(self, strategy: GuardedStrategy, parameters: Parameters) -> None:
        """The final model, after the report, to the clients that were still busy with a late fit
        when the last round evaluated (their stream takes one instruction at a time)."""
        s = self.settings
        self.client_manager.wait_free(s.round_timeout)
        missing = [p for cid, p in self.client_manager.all().items() if cid not in self.last_evaluated]
        hand_out(missing, parameters, strategy.evaluate_config(s.num_rounds), s.round_timeout, s.num_rounds)

    def fit_first(
        self, instructions: list[tuple[ClientProxy, FitIns]], server_round: int, started: float
    ) -> tuple[list[tuple[ClientProxy, FitRes]], list, int]:
        """Flower's fit_clients, ending with the first FIT_QUORUM share of the sampled clients'
        answers or at ROUND_DEADLINE (over-selection): (results, failures, late). A late client
        is held (not sampled) until its answer, which is dropped, arrives or times out."""
        s = self.settings
        quorum = max(1, math.ceil(s.fit_quorum * len(instructions)))
        pool = ThreadPoolExecutor(max_workers=len(instructions), thread_name_prefix=f"fit-{server_round}")
        pending: dict[Future, ClientProxy] = {
            pool.submit(proxy.fit, ins, s.round_timeout, server_round): proxy for proxy, ins in instructions
        }
        pool.shutdown(wait=False)  # late fits end on their own; nothing waits for them
        results: list[tuple[ClientProxy, FitRes]] = []
        failures: list = []
        end = None if s.round_deadline is None else started + s.round_deadline
        while pending and len(results) < quorum:
            left = None if end is None else max(0.0, end - time.perf_counter())
            done, _ = wait(list(pending), timeout=left, return_when=FIRST_COMPLETED)
            if not done:
                break  # ROUND_DEADLINE
            for future in done:
                proxy = pending.pop(future)
                exc = future.exception()
                if exc is not None:
                    failures.append(exc)
                    continue
                res = future.result()
                (results if res.status.code == Code.OK else failures).append((proxy, res))
        for future, proxy in pending.items():
            self.client_manager.hold_until(proxy.cid, future)
        if pending:
            why = "ROUND_DEADLINE" if len(results) < quorum else f"FIT_QUORUM={s.fit_quorum:g}"
            log.info(
                "round %d: did not wait for %d late client(s) (%s): %s; their answers are dropped",
                server_round, len(pending), why, ", ".join(sorted(client_label(p) for p in pending.values())),
            )  # fmt: skip
        return results, failures, len(pending)

    def model_meta(self, record: RoundRecord) -> dict[str, Any]:
        s = self.settings
        return {
            "round": record.round,
            "num_rounds": s.num_rounds,
            "strategy": s.strategy,
            "dataset": s.dataset,
            "task": s.task_name,  # predict refuses the model under another task
            "eval_accuracy": record.eval_accuracy,
            "eval_loss": record.eval_loss,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def run_failure(history: list[RoundRecord], final: Parameters, guard: GuardedStrategy) -> str | None:
    """Why a run that played all its rounds did not produce a usable model, or None."""
    tail = history[-FAILED_FINAL_ROUNDS:]
    if tail and all(record.failed for record in tail):
        return (
            f"its last {len(tail)} rounds all failed, the last one because {tail[-1].failed}; "
            f"the final model is that of round {guard.sound[0]} at best"
        )
    if not guard.finite(final):
        return "its final model holds NaN or Inf values"
    if history and final is guard.initial:
        return (
            f"no model of its {len(history)} rounds was kept: each failed or was rolled back, "
            "and the final model is the starting one"
        )
    last = history[-1] if history else None
    if last is not None and last.clients_evaluated == 0 and last.eval_failures > 0:
        return f"no client could evaluate its final model ({last.eval_failures} evaluations failed or were refused)"
    return None


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The run-defining settings (names in capitals) in which a checkpoint's run differs from
    this one. A setting that a checkpoint of an earlier version did not know yet counts as
    unchanged while it has its default: that version ran as if it had."""
    fields = Settings.model_fields
    defaults = {n: str(d) if isinstance(d := fields[n].default, Path) else d for n in current}
    changed = [
        name
        for name, value in current.items()
        if saved.get(name, defaults[name] if value == defaults[name] else object()) != value
    ]
    # a setting since retired: its run resumes only if it ran as this version does
    changed += [name for name in RETIRED if name in saved and retired_problem(name, saved[name], "") is not None]
    return sorted(name.upper() for name in changed)


def strategy_buffer(settings: Settings) -> str:
    size, name = settings.updates_per_aggregation
    return f"{name}={size}"


def round_line(record: RoundRecord, num_rounds: int) -> str:
    failed = record.clients_failed + record.updates_refused
    if record.staleness_mean is None:
        head, measured = f"round {record.round}/{num_rounds}: {record.clients_trained} trained, {failed} failed", ""
        if record.updates_late:
            head += f", {record.updates_late} late"
    else:  # async mode: one line per model version, whose evaluation may be of an earlier one
        head = (
            f"version {record.round}/{num_rounds}: {record.clients_trained} updates"
            f" (staleness mean {record.staleness_mean:.1f}, max {record.staleness_max}),"
            f" {failed} failed, {record.updates_stale} too stale"
        )
        measured = "" if record.eval_version is None else f" of version {record.eval_version}"
    # A round or version that nobody evaluated says nothing about evaluation.
    evaluated = record.clients_evaluated > 0 or record.eval_loss is not None
    return (
        f"{head} | train loss {fmt(record.train_loss)}"
        + (
            f" | eval{measured} loss {fmt(record.eval_loss)}, accuracy {fmt(record.eval_accuracy)}"
            f" ({record.clients_evaluated} clients)"
            if evaluated
            else ""
        )
        + f" | {record.seconds:.2f} s"
        + ("" if record.clients_connected is None else f", {record.clients_connected} connected")
        + (f" | FAILED, model kept: {record.failed}" if record.failed else "")
    )
