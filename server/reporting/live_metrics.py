"""Live Prometheus metrics of a run, served over HTTP on METRICS_PORT (0: no HTTP server at all).

The round loop calls `LiveMetrics.round_done` once per round; that only updates
prometheus_client's in-memory values (microseconds, no I/O). Scrapes are answered by
prometheus_client's own server thread. Every series carries the run's id, which `run.json` in
RESULTS_DIR also holds, so a dashboard and the results name the same run. Per-client series are
labelled by site (the client's name) and shard, never by a random id, and at most
MAX_CLIENT_SERIES label pairs get series of their own: a scrape stays small with any number of
clients.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info, Metric, start_http_server

from shared import protocol
from shared.errors import BadInput

log = logging.getLogger("flowerpot.server")

# What became of the fits a round or version asked for: flowerpot_fit_results_total{outcome}.
FIT_OUTCOMES = ("trained", "failed", "refused", "stale", "late")

RUN_FILE = "run.json"  # in RESULTS_DIR: the run's id, read again when an unfinished run resumes
STATES = ("waiting", "running", "finished", "failed")
# Round wall times from a tenth of a second (digits on loopback) to half an hour (large models).
ROUND_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
MAX_CLIENT_SERIES = 64
SCRAPE_GRACE = 0.5  # seconds to finish answering the scrape that ends the linger
OTHER = "other"  # the label of every client beyond MAX_CLIENT_SERIES
# An update's refusal reason, from the guard's message (server/training/strategies.py), as a bounded label.
REFUSAL_REASONS = (
    ("UPDATE_NORM_MEDIAN_MULTIPLE", "norm_median"),
    ("UPDATE_NORM_LIMIT", "norm_limit"),
    ("the data set can give", "too_many_examples"),
    ("its metric", "bad_metric"),
    ("examples", "no_examples"),
    ("arrays, the model has", "array_count"),
    ("cannot be decoded", "undecodable"),
    ("expected", "shape_or_dtype"),
    ("NaN or Inf", "not_finite"),
)


def new_run_id() -> str:
    """Sortable by start time, and unique across servers started in the same second."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def run_identity(folder: Path, resumed: bool, fingerprint: Mapping[str, Any], write: bool = True) -> str:
    """The run's id: the one in RESULTS_DIR/run.json when the run resumes, else a new one,
    written there unless `write` is false (then write_run_file, once the previous run's results
    have been moved aside)."""
    path = folder / RUN_FILE
    if resumed and path.is_file():
        try:
            return str(json.loads(path.read_text())["run_id"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s cannot be read: the resumed run gets a new id", path)
    run_id = new_run_id()
    if write:
        write_run_file(folder, run_id, fingerprint)
    return run_id


def write_run_file(folder: Path, run_id: str, fingerprint: Mapping[str, Any]) -> None:
    record = {"run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": dict(fingerprint)}
    tmp = folder / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, folder / RUN_FILE)


def refusal_reason(problem: str) -> str:
    return next((label for text, label in REFUSAL_REASONS if text in problem), OTHER)


def _get(record: Any, key: str) -> Any:
    """A field of a round record or a client record, whether a dict or a dataclass."""
    return record.get(key) if isinstance(record, Mapping) else getattr(record, key, None)


class LiveMetrics:
    """The run's metrics in a registry of its own (so that tests can hold several), served on
    `host:port` once `serve` is called with a port above 0."""

    def __init__(self, num_rounds: int, linger: float = 0.0) -> None:
        self.num_rounds, self.linger = num_rounds, linger
        self.registry = CollectorRegistry(auto_describe=True)
        self.run_id = ""
        self._server: Any = None
        self._clients: dict[tuple[str, str], tuple[str, str]] = {}  # (site, shard) -> its labels
        self._lock = threading.Lock()
        self._ended_at: float | None = None
        self._scraped = False  # by anyone, ever: without a scraper there is nobody to linger for
        self._scraped_after_end = threading.Event()
        self.registry.register(_ScrapeWatch(self._on_scrape))
        r, run = self.registry, ["run_id"]
        self.info = Info("flowerpot_run", "The run: strategy, data set, number of rounds", run, registry=r)
        self.state = Enum("flowerpot_run_state", "Where the run is", run, states=list(STATES), registry=r)
        self.round = Gauge("flowerpot_round", "The latest finished round", run, registry=r)
        self.rounds = Gauge("flowerpot_num_rounds", "Rounds the run plays (NUM_ROUNDS)", run, registry=r)
        self.connected = Gauge("flowerpot_connected_clients", "Clients connected now", run, registry=r)
        self.trained = Gauge("flowerpot_clients_trained", "Clients whose update the latest round used", run, registry=r)
        self.failed = Gauge(
            "flowerpot_clients_failed", "Clients that failed to train in the latest round", run, registry=r
        )
        self.refused = Gauge("flowerpot_updates_refused", "Updates refused in the latest round", run, registry=r)
        self.evaluated = Gauge(
            "flowerpot_clients_evaluated", "Clients that evaluated in the latest round", run, registry=r
        )
        self.fit_results = Counter(
            "flowerpot_fit_results",
            "Client updates by outcome (trained, failed, refused)",
            [*run, "outcome"],
            registry=r,
        )
        self.refusals = Counter(
            "flowerpot_updates_refused_by_reason", "Refused client updates by reason", [*run, "reason"], registry=r
        )
        self.duration = Histogram(
            "flowerpot_round_duration_seconds",
            "Wall time of a round (train, aggregate, evaluate)",
            run,
            buckets=ROUND_BUCKETS,
            registry=r,
        )
        self.losses = {
            key: Gauge(f"flowerpot_{key}", f"{text} of the latest round", run, registry=r)
            for key, text in (
                ("train_loss", "Training loss (weighted mean over clients)"),
                ("train_accuracy", "Training accuracy (weighted mean over clients)"),
                ("eval_loss", "Evaluation loss (weighted mean over clients)"),
                ("eval_accuracy", "Evaluation accuracy (weighted mean over clients)"),
            )
        }
        self.epsilon = Gauge(
            "flowerpot_privacy_epsilon",
            "Epsilon spent after the latest round: DP=client the run's, per client; DP=record the most spent site's",
            run,
            registry=r,
        )
        self.sent = Counter(
            "flowerpot_bytes_sent", "Bytes of Flower messages sent to clients in rounds", run, registry=r
        )
        self.received = Counter(
            "flowerpot_bytes_received", "Bytes of Flower messages received in rounds", run, registry=r
        )
        client = [*run, "site", "shard"]
        self.client_values = {
            key: Gauge(f"flowerpot_client_{key}", f"{text}, per client (site and shard)", client, registry=r)
            for key, text in (
                ("train_loss", "Local training loss of the latest round"),
                ("eval_loss", "Local evaluation loss of the latest evaluation"),
                ("eval_accuracy", "Local evaluation accuracy of the latest evaluation"),
                ("examples", "Training examples of the latest round"),
                ("privacy_epsilon", "Epsilon its shard's privacy ledger has spent (DP=record), after its latest fit"),
            )
        }

        # The task's METRICS (declared by its clients at join): one series per name and phase.
        self.task_metrics: frozenset[str] = frozenset()
        self.task_values = Gauge(
            "flowerpot_task_metric",
            "A metric of the task's METRICS, weighted mean over clients, of the latest round",
            [*run, "phase", "name"],
            registry=r,
        )
        self.client_task_values = Gauge(
            "flowerpot_client_task_metric",
            "A metric of the task's METRICS, per client (site and shard), of its latest round",
            [*client, "phase", "name"],
            registry=r,
        )

    def watch_task_metrics(self, names: Iterable[str]) -> None:
        """The run's task declared these metrics (at most a few: shared/protocol.py bounds them)."""
        self.task_metrics = frozenset(names)

    def serve(self, host: str, port: int) -> None:
        """Start the HTTP endpoint (nothing when port is 0); BadInput when it cannot be bound."""
        if port == 0:
            return
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise BadInput(
                f"METRICS_PORT={port} cannot be bound on {host} ({exc.strerror or exc}): stop what uses it, "
                "choose another port, or 0 to turn the metrics off"
            ) from None
        log.info("metrics on http://%s:%d/metrics", host, port)

    def begin(
        self,
        folder: Path,
        resumed: bool,
        fingerprint: Mapping[str, Any],
        connected: Callable[[], float],
        write: bool = True,
    ) -> str:
        """Name the run (see `run_identity`): from now on every series carries its id."""
        self.run_id = run_id = run_identity(folder, resumed, fingerprint, write)
        details = {k: str(fingerprint.get(k)) for k in ("strategy", "dataset", "partition", "num_rounds")}
        self.info.labels(run_id).info(details)
        self.rounds.labels(run_id).set(self.num_rounds)
        self.connected.labels(run_id).set_function(connected)
        self.state.labels(run_id).state("waiting")
        # Every counter exists from the start, at 0: a run shorter than Prometheus' scrape interval
        # would otherwise leave one sample of each, and rate() needs two.
        for outcome in FIT_OUTCOMES:
            self.fit_results.labels(run_id, outcome)
        self.sent.labels(run_id)
        self.received.labels(run_id)
        self.duration.labels(run_id)
        for reason in (*(label for _, label in REFUSAL_REASONS), OTHER):
            self.refusals.labels(run_id, reason)
        log.info("run id %s", run_id)
        return run_id

    def running(self, first_round: int) -> None:
        self.state.labels(self.run_id).state("running")
        self.round.labels(self.run_id).set(first_round - 1)

    def round_done(self, record: Any, refusals: Iterable[str] = ()) -> None:
        """One round's record (see server/training/rounds.py) and the guard's refusal messages: in-memory
        updates only."""
        run = self.run_id
        trained, failed, refused = (
            _get(record, k) or 0 for k in ("clients_trained", "clients_failed", "updates_refused")
        )
        self.round.labels(run).set(_get(record, "round"))
        self.trained.labels(run).set(trained)
        self.failed.labels(run).set(failed)
        self.refused.labels(run).set(refused)
        self.evaluated.labels(run).set(_get(record, "clients_evaluated") or 0)
        stale = _get(record, "updates_stale") or 0  # async mode: dropped as staler than MAX_STALENESS
        late = _get(record, "updates_late") or 0  # sync over-selection: not waited for, dropped
        counts = {"trained": trained, "failed": failed, "refused": refused, "stale": stale, "late": late}
        for outcome, count in counts.items():
            self.fit_results.labels(run, outcome).inc(count)
        for problem in refusals:
            self.refusals.labels(run, refusal_reason(problem)).inc()
        self.duration.labels(run).observe(_get(record, "seconds") or 0.0)
        for key, gauge in self.losses.items():
            value = _get(record, key)
            if value is not None:
                gauge.labels(run).set(value)
        epsilon = (_get(record, "fit_metrics") or {}).get(protocol.PRIVACY_EPSILON)
        if isinstance(epsilon, int | float) and not isinstance(epsilon, bool):
            self.epsilon.labels(run).set(epsilon)
        self.sent.labels(run).inc(_get(record, "bytes_sent") or 0)
        self.received.labels(run).inc(_get(record, "bytes_received") or 0)
        for phase, metrics, prefix in (("fit", "fit_metrics", "train_"), ("evaluate", "eval_metrics", "")):
            for name in self.task_metrics:
                value = (_get(record, metrics) or {}).get(prefix + name)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.task_values.labels(run, phase, name).set(value)
        for client in _get(record, "clients") or ():
            self._client_round(client)

    def _client_round(self, client: Any) -> None:
        metrics = _get(client, "metrics") or {}
        site = _get(client, "site") or _get(client, "client") or ""  # the site it joined with (SITE_NAME)
        shard = _get(client, "shard") or metrics.get(protocol.SHARD, "")
        site, shard = self._labels(str(site), str(shard))
        values = self.client_values
        phase = _get(client, "phase")
        for name in self.task_metrics:
            value = metrics.get(f"train_{name}" if phase == "fit" else name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.client_task_values.labels(self.run_id, site, shard, phase, name).set(value)
        if phase == "fit":
            self._set(values["train_loss"], site, shard, metrics.get(protocol.TRAIN_LOSS))
            self._set(values["examples"], site, shard, _get(client, "num_examples"))
            self._set(values["privacy_epsilon"], site, shard, metrics.get(protocol.PRIVACY_EPSILON))
        else:
            self._set(values["eval_loss"], site, shard, metrics.get("loss"))
            self._set(values["eval_accuracy"], site, shard, metrics.get(protocol.ACCURACY))

    def _set(self, gauge: Gauge, site: str, shard: str, value: Any) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            gauge.labels(self.run_id, site, shard).set(value)

    def _labels(self, site: str, shard: str) -> tuple[str, str]:
        with self._lock:
            known = self._clients.get((site, shard))
            if known is None:
                known = (site, shard) if len(self._clients) < MAX_CLIENT_SERIES else (OTHER, OTHER)
                self._clients[(site, shard)] = known
            return known

    def end(self, ok: bool) -> None:
        if self.run_id:
            self.state.labels(self.run_id).state("finished" if ok else "failed")
            self._ended_at = time.monotonic()

    def _on_scrape(self) -> None:
        self._scraped = True
        if self._ended_at is not None:
            self._scraped_after_end.set()

    def close(self, linger: bool = True) -> None:
        """Keep serving the final values until they have been scraped once, at most METRICS_LINGER
        seconds, so that the last round reaches Prometheus; then stop. A run nobody scraped is
        not held up at all (e.g. `run-local`, or Compose without the monitoring profile), nor is
        a stopped server (`linger=False`: SIGTERM must end it within seconds)."""
        if self._server is None:
            return
        if linger and self.linger > 0 and self._ended_at is not None and self._scraped:
            log.info("serving the final metrics until they are scraped, at most METRICS_LINGER=%g s", self.linger)
            if self._scraped_after_end.wait(self.linger):
                time.sleep(SCRAPE_GRACE)  # the scrape's answer is still being written
        self._server.shutdown()
        self._server.server_close()
        self._server = None


class _ScrapeWatch:
    """A collector with no metrics: told of every scrape, since the registry collects each time."""

    def __init__(self, on_scrape: Callable[[], None]) -> None:
        self.on_scrape = on_scrape

    def collect(self) -> Iterator[Metric]:
        self.on_scrape()
        return iter(())

    def describe(self) -> list[Metric]:
        return []


def metrics_host(listen_address: str) -> str:
    """The metrics endpoint listens on the gRPC listener's host: 127.0.0.1 stays on this machine."""
    host = listen_address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host
