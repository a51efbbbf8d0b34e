"""Live metrics: the server's Prometheus endpoint during real runs (real processes, real gRPC),
a real Prometheus scraping it for every query of the Grafana dashboard, and the monitoring
profile's files. Prometheus is Debian's binary (`apt-get install prometheus`, as .ci/run does);
without it those tests skip and say why."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.compose import committed_env
from conftest import REPO, federation_env, free_address
from flowerpot.launcher import free_port
from server.reporting.live_metrics import MAX_CLIENT_SERIES, OTHER, RUN_FILE, LiveMetrics, refusal_reason, run_identity

MONITORING = REPO / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "flowerpot.json"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="no prometheus binary on PATH: `apt-get install prometheus` (as .ci/run does)"
)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every flowerpot_ sample of one scrape, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("flowerpot_")
    }


def value(samples: dict, metric: str, /, **labels: str) -> float | None:
    """The one sample of `metric` whose labels include `labels` (a label may be called `name`)."""
    found = [v for (n, ls), v in samples.items() if n == metric and labels.items() <= dict(ls).items()]
    assert len(found) <= 1, (metric, labels, found)
    return found[0] if found else None


class Scraper:
    """Scrapes an endpoint every few milliseconds in a thread and keeps every answer."""

    def __init__(self, port: int) -> None:
        self.port, self.scrapes = port, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.scrapes.append(scrape(self.port))
            except OSError:  # not up yet, or gone
                continue

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.scrapes


def start(federation, env: dict[str, str], before_clients=None) -> tuple[Any, list[Any]]:
    """The server, then (after `before_clients()`, if given) three clients named site-1..3."""
    run = federation(env)
    if before_clients is not None:
        before_clients()
    for i in (1, 2, 3):
        run.start_client(i, CLIENT_NAME=f"site-{i}", SITE_NAME=f"site-{i}")
    return run.server, run.clients


def results_of(tmp_path: Path) -> tuple[list[dict], str]:
    results = tmp_path / "results"
    return json.loads((results / "history.json").read_text()), json.loads((results / RUN_FILE).read_text())["run_id"]


def test_the_endpoint_moves_round_by_round_and_ends_at_the_history(federation, data_dir: Path, tmp_path: Path) -> None:
    """The one test with METRICS_LINGER: the server keeps its final values until they are scraped."""
    port = free_port()
    env = federation_env(data_dir, tmp_path, free_address(), NUM_ROUNDS="4", METRICS_PORT=str(port),
                         METRICS_LINGER="60")  # fmt: skip
    server, clients = start(federation, env)
    scraper = Scraper(port)
    server.wait_for(r"finished 4 rounds", timeout=120)
    started = time.monotonic()
    assert server.wait(60) == 0, server.output
    lingered = time.monotonic() - started
    scrapes = scraper.stop()
    assert [c.wait() for c in clients] == [0, 0, 0]
    rounds, run_id = results_of(tmp_path)

    assert f"run id {run_id}" in server.output
    assert f"metrics on http://127.0.0.1:{port}/metrics" in server.output
    assert lingered < 30  # it stopped once the final values were scraped, not after METRICS_LINGER
    seen = [s for s in scrapes if value(s, "flowerpot_round") is not None]
    assert all(dict(ls)["run_id"] == run_id for s in seen for _, ls in s)  # every series names the run
    by_round = [value(s, "flowerpot_round") for s in seen]
    assert by_round == sorted(by_round) and len(set(by_round)) >= 3, by_round  # moves, round by round
    trained = [value(s, "flowerpot_fit_results_total", outcome="trained") for s in seen]
    assert trained == sorted(trained) and trained[0] < trained[-1]
    assert max(value(s, "flowerpot_connected_clients") for s in seen) == 3
    running = [s for s in seen if value(s, "flowerpot_run_state", flowerpot_run_state="running") == 1]
    assert running, "never seen running"

    final = seen[-1]
    last = rounds[-1]
    assert value(final, "flowerpot_run_state", flowerpot_run_state="finished") == 1
    assert value(final, "flowerpot_round") == 4 == value(final, "flowerpot_num_rounds")
    for key in ("eval_accuracy", "eval_loss", "train_loss", "train_accuracy"):
        assert value(final, f"flowerpot_{key}") == last[key], key  # exact: Prometheus' text keeps every digit
    for key in ("clients_trained", "clients_failed", "updates_refused", "clients_evaluated"):
        assert value(final, f"flowerpot_{key}") == last[key], key
    for outcome, key in (("trained", "clients_trained"), ("failed", "clients_failed"), ("refused", "updates_refused")):
        assert value(final, "flowerpot_fit_results_total", outcome=outcome) == sum(r[key] for r in rounds)
    assert value(final, "flowerpot_bytes_sent_total") == sum(r["bytes_sent"] for r in rounds)
    assert value(final, "flowerpot_bytes_received_total") == sum(r["bytes_received"] for r in rounds)
    assert value(final, "flowerpot_round_duration_seconds_count") == 4
    assert value(final, "flowerpot_round_duration_seconds_sum") == pytest.approx(sum(r["seconds"] for r in rounds))
    for client in (c for c in last["clients"] if c["phase"] == "evaluate"):
        labels = {"site": client["site"], "shard": client["shard"]}
        assert value(final, "flowerpot_client_eval_accuracy", **labels) == client["metrics"]["accuracy"]
    assert {dict(ls)["site"] for n, ls in final if n == "flowerpot_client_eval_accuracy"} == {
        "site-1",
        "site-2",
        "site-3",
    }


def test_without_metrics_port_nothing_listens_and_nothing_lingers(federation, data_dir: Path, tmp_path: Path) -> None:
    env = federation_env(data_dir, tmp_path, free_address(), NUM_ROUNDS="1", METRICS_LINGER="60")
    server, clients = start(federation, env)
    assert server.wait(90) == 0, server.output
    assert [c.wait() for c in clients] == [0, 0, 0]
    assert "metrics on" not in server.output and "serving the final metrics" not in server.output
    assert results_of(tmp_path)[1]  # the run is still named in the results


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    """prometheus(target_port) starts Debian's Prometheus scraping 127.0.0.1:target_port every
    second, on a free port with its storage in tmp_path; returns its base URL."""
    procs: list[subprocess.Popen] = []

    def run(target_port: int) -> str:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "flowerpot", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}
                    ],
                }
            )
        )
        address = f"127.0.0.1:{free_port()}"
        log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 (closed with the process)
        procs.append(
            subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address={address}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        url = f"http://{address}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return url
            except OSError:
                time.sleep(0.2)
        raise AssertionError("prometheus not ready in 30 s:\n" + (tmp_path / "prometheus.log").read_text())

    yield run
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until_scraped(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/api/v1/query?query=up", timeout=5) as response:
            if any(r["value"][1] == "1" for r in json.loads(response.read())["data"]["result"]):
                return
        time.sleep(0.2)
    raise AssertionError(f"Prometheus did not scrape the server within {timeout} s")


def query_range(url: str, expr: str, start: float, end: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1"})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def dashboard_targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


@needs_prometheus
def test_a_real_prometheus_has_data_for_every_dashboard_query(
    federation, prometheus, data_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = prometheus(port)
    env = federation_env(data_dir, tmp_path, free_address(), METRICS_PORT=str(port), METRICS_LINGER="30")
    began = time.time()
    # the clients come once Prometheus has scraped the waiting server: a run of a few seconds
    # must not end before the first scrape (a server nobody scraped does not linger)
    server, clients = start(federation, env, before_clients=lambda: wait_until_scraped(url))
    assert server.wait(120) == 0, server.output
    assert [c.wait() for c in clients] == [0, 0, 0]
    assert "serving the final metrics" in server.output
    ended = time.time() + 1
    rounds, run_id = results_of(tmp_path)

    asked = 0
    for title, expr in dashboard_targets():
        if "flowerpot_" not in expr:
            continue  # container CPU and memory come from cAdvisor, which is not here
        concrete = expr.replace("$run_id", run_id).replace("$__rate_interval", "1m")
        result = query_range(url, concrete, began, ended)
        assert result, f"panel {title!r}: no data for {concrete}"
        asked += 1
    assert asked >= 15
    # The last scrape Prometheus holds is the run's end, as the history has it.
    final = {
        name: float(query_range(url, f'{name}{{run_id="{run_id}"}}', began, ended)[0]["values"][-1][1])
        for name in ("flowerpot_round", "flowerpot_eval_accuracy", "flowerpot_clients_evaluated")
    }
    assert final == {
        "flowerpot_round": 3,
        "flowerpot_eval_accuracy": rounds[-1]["eval_accuracy"],
        "flowerpot_clients_evaluated": 3,
    }


def test_the_dashboard_is_a_grafana_dashboard_on_the_provisioned_datasource(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels) >= 12
    for panel in panels:
        assert panel["type"] in {"stat", "timeseries"} and panel["title"], panel
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip()
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "run_id" and variable["datasource"]["uid"] == uid
    # every flowerpot_ metric the dashboard asks for is one the server exports
    asked = {m for _, expr in dashboard_targets() for m in re.findall(r"flowerpot_\w+", expr)}
    assert asked - exported_names(tmp_path) == set()
    wanted = {"eval_accuracy", "eval_loss", "train_loss", "round_duration", "connected_clients", "failed", "bytes"}
    assert all(any(w in m for m in asked) for w in wanted)
    assert any("container_cpu" in e for _, e in dashboard_targets())
    assert any("container_memory" in e for _, e in dashboard_targets())


def exported_names(folder: Path) -> set[str]:
    """The sample names of a LiveMetrics after one round with a client."""
    live = LiveMetrics(1)
    live.begin(folder, False, {}, lambda: 1)
    record = {"round": 1, "seconds": 0.1, "bytes_sent": 1, "bytes_received": 1}
    record |= {k: 0.5 for k in ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy")}
    record["clients"] = [
        {"client": "a", "phase": "fit", "num_examples": 1, "metrics": {"train_loss": 0.5, "shard": "s"}},
        {"client": "a", "phase": "evaluate", "num_examples": 1, "metrics": {"loss": 0.5, "accuracy": 1, "shard": "s"}},
    ]
    live.round_done(record)
    return {s.name for metric in live.registry.collect() for s in metric.samples}


@pytest.mark.compose
def test_the_compose_profile_adds_prometheus_and_grafana_on_localhost_only() -> None:
    from bench.compose import docker
    from compose_checks import docker_available

    if not docker_available():
        pytest.skip("no Docker engine with Compose v2: `docker compose config` cannot run")
    files = ["-f", str(REPO / "docker-compose.yml")]
    plain = json.loads(docker("compose", *files, "config", "--format", "json").stdout)
    assert {"prometheus", "grafana"} & plain["services"].keys() == set()  # not without the profile
    config = json.loads(docker("compose", *files, "--profile", "monitoring", "config", "--format", "json").stdout)
    services = config["services"]
    assert {"prometheus", "grafana"} <= services.keys()
    assert "ports" not in services["server"] and "ports" not in services["prometheus"]
    (published,) = services["grafana"]["ports"]
    assert published["host_ip"] == "127.0.0.1" and published["target"] == 3000
    grafana_env = services["grafana"]["environment"]
    assert grafana_env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and grafana_env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    for service in ("prometheus", "grafana"):
        for mount in services[service]["volumes"]:
            if mount["type"] == "bind":
                assert Path(mount["source"]).exists(), mount
    scrape = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    env_port = re.search(r"^METRICS_PORT=(\d+)$", committed_env(), re.M)
    assert env_port and f"server:{env_port.group(1)}" in targets  # .env's port is the one scraped
    assert int(env_port.group(1)) not in (9090, 9100, 8080)


def test_the_run_id_is_kept_when_the_run_resumes(tmp_path: Path) -> None:
    first = run_identity(tmp_path, resumed=False, fingerprint={"num_rounds": 3})
    assert run_identity(tmp_path, resumed=True, fingerprint={"num_rounds": 3}) == first
    assert run_identity(tmp_path, resumed=False, fingerprint={"num_rounds": 3}) != first
    assert json.loads((tmp_path / RUN_FILE).read_text())["settings"] == {"num_rounds": 3}


def test_labels_stay_bounded_and_refusals_have_a_few_reasons(tmp_path: Path) -> None:
    live = LiveMetrics(1)
    live.begin(tmp_path, False, {}, lambda: 0)
    clients = [
        {"client": f"host-{i}", "phase": "evaluate", "num_examples": 1, "metrics": {"accuracy": 0.5, "shard": "s"}}
        for i in range(MAX_CLIENT_SERIES + 20)
    ]
    live.round_done({"round": 1, "clients": clients}, ["array 0 holds NaN or Inf values", "it claims 0 examples"])
    sites = {s.labels["site"] for m in live.registry.collect() if m.name == "flowerpot_client_eval_accuracy"
             for s in m.samples}  # fmt: skip
    assert len(sites) == MAX_CLIENT_SERIES + 1 and OTHER in sites
    assert refusal_reason("array 2 is float64[3], expected float32[3]") == "shape_or_dtype"
    assert refusal_reason("it has 3 arrays, the model has 4") == "array_count"
    assert refusal_reason("something new") == OTHER


def test_every_counter_is_exposed_at_zero_before_the_first_round(tmp_path: Path) -> None:
    """A run that ends between two scrapes leaves Prometheus one sample of a counter born at its first
    round, and rate() of one sample is empty: the dashboard's traffic panel had no data."""
    live = LiveMetrics(1)
    run_id = live.begin(tmp_path, False, {}, lambda: 0)
    exposed = {
        (s.name, s.labels.get("outcome")) for m in live.registry.collect() for s in m.samples
        if s.labels.get("run_id") == run_id
    }  # fmt: skip
    for name in ("flowerpot_bytes_sent_total", "flowerpot_bytes_received_total",
                 "flowerpot_round_duration_seconds_count"):  # fmt: skip
        assert (name, None) in exposed, name
    for outcome in ("trained", "failed", "refused", "stale", "late"):
        assert ("flowerpot_fit_results_total", outcome) in exposed, outcome


def test_a_server_nobody_scraped_does_not_linger(tmp_path: Path) -> None:
    live = LiveMetrics(1, linger=60)
    port = free_port()
    live.serve("127.0.0.1", port)
    live.begin(tmp_path, False, {}, lambda: 0)
    live.end(True)
    started = time.monotonic()
    live.close()
    assert time.monotonic() - started < 5
    with pytest.raises(OSError):
        scrape(port)  # and the port is closed


def test_every_refusal_of_the_guard_has_its_own_reason_label() -> None:
    """The labels come from the guard's own messages: each kind of bad update is named, none is 'other'."""
    import numpy as np
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from server.reporting.live_metrics import refusal_reason
    from server.training.strategies import build_strategy
    from server.training.update_checks import clean_metrics
    from shared.settings import Settings

    model = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]
    strategy = build_strategy(Settings(update_norm_limit=10), ndarrays_to_parameters(model))

    def fit(arrays: list, examples: int = 10, metrics: dict | None = None) -> FitRes:
        return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), examples, metrics or {})

    cases = {
        "no_examples": fit(model, examples=0),
        "too_many_examples": fit(model, examples=10**9),
        "array_count": fit(model[:1]),
        "shape_or_dtype": fit([np.zeros((2, 3), np.float32), model[1]]),
        "not_finite": fit([np.full((3, 2), np.nan, np.float32), model[1]]),
        "norm_limit": fit([np.full((3, 2), 100, np.float32), model[1]]),
    }
    for label, res in cases.items():
        problem = strategy.problem(res)
        assert problem is not None and refusal_reason(problem) == label, (label, problem)
    _, _, metric_problem = clean_metrics({"accuracy": 7.0}, {"accuracy": "ratio"})
    assert metric_problem is not None and refusal_reason(metric_problem) == "bad_metric", metric_problem
