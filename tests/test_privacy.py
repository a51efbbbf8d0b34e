"""Differential privacy at the sites (DP=record): DP-SGD's parts, the ledger, and real runs whose
privacy.json is recomputed with another accountant than the one the clients use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.superlink.fleet.grpc_bidi.grpc_bridge import GrpcBridge
from torch import nn

from client.privacy import dpsgd
from client.privacy.ledger import Ledger, Spend, epsilon
from conftest import free_address
from server.reporting.live_metrics import LiveMetrics
from server.reporting.privacy import report_privacy
from server.reporting.record import ClientEntry, RoundRecord
from server.training.client_privacy import ClientLevel
from server.training.strategies import GuardedStrategy, build_strategy
from server.transport.wiring import NamedClientProxy
from shared.errors import BadInput
from shared.settings import Settings


def named_proxy(i: int) -> NamedClientProxy:
    return NamedClientProxy(cid=f"cid{i}", bridge=GrpcBridge(), name=f"client-{i}")


def dp_accounting_epsilon(spends: list[list[float]], delta: float) -> float:
    """Epsilon of a ledger by Google's dp-accounting RDP accountant: not the clients' Opacus."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    for noise, rate, steps in spends:
        event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
        accountant.compose(event, int(steps))
    return accountant.get_epsilon(delta)


@pytest.mark.unit
def test_each_example_is_clipped_to_the_clip_norm_before_the_sum() -> None:
    """An outlier example (norm 1,000) contributes exactly the clip norm; small ones pass whole."""
    rows = torch.tensor([[0.3, 0.4], [600.0, 800.0], [0.0, 0.1]])  # norms 0.5, 1000, 0.1
    bias = torch.tensor([[0.0], [0.0], [0.0]])
    summed = dpsgd.clipped_sum([rows, bias], clip_norm=1.0)
    assert torch.allclose(summed[0], torch.tensor([0.3 + 0.6, 0.4 + 0.8 + 0.1]), atol=1e-6)
    # Over all parameters together: the outlier's two tensors share one factor.
    model = nn.Linear(2, 1)
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, loss_reduction="sum")
    x = torch.tensor([[1.0, 0.0], [1000.0, 1000.0], [0.0, 1.0]])
    wrapped(x).sum().backward()
    per_example = [p.grad_sample for p in model.parameters()]
    norms = torch.sqrt(sum(g.reshape(3, -1).pow(2).sum(1) for g in per_example))
    assert norms[1] > 1000
    factor = (1.0 / norms).clamp(max=1.0)
    for got, g in zip(dpsgd.clipped_sum(per_example, 1.0), per_example):
        assert torch.allclose(got, torch.einsum("i,i...->...", factor, g))
    clipped_norms = torch.sqrt(sum((g * factor.view(-1, *[1] * (g.dim() - 1))).reshape(3, -1).pow(2).sum(1)
                                   for g in per_example))  # fmt: skip
    assert float(clipped_norms.max()) <= 1.0 + 1e-5
    wrapped._close()


@pytest.mark.unit
def test_poisson_batches_vary_in_size_around_the_expected_one() -> None:
    sizes = np.array([len(dpsgd.poisson_batch(1000, 0.05)) for _ in range(2000)])
    assert abs(sizes.mean() - 50) < 1.0  # standard error 0.15
    assert 5.5 < sizes.std() < 8.3  # binomial: sqrt(1000 x 0.05 x 0.95) = 6.9
    batch = dpsgd.poisson_batch(1000, 0.05)
    assert len(set(batch.tolist())) == len(batch) and all(0 <= i < 1000 for i in batch.tolist())


@pytest.mark.unit
def test_the_noise_has_the_calibrated_deviation_and_no_seed_replays_it() -> None:
    noise = dpsgd.gaussian_noise(torch.Size([400, 500]), std=2.5)
    assert noise.shape == (400, 500) and noise.dtype == torch.float32
    assert abs(float(noise.mean())) < 0.02  # standard error 0.0056
    assert abs(float(noise.std()) / 2.5 - 1) < 0.01  # standard error 0.16 %
    fourth = float(((noise / 2.5) ** 4).mean())
    assert abs(fourth - 3) < 0.1  # a Gaussian's kurtosis, not a uniform's or a sum of few
    torch.manual_seed(0)
    np.random.seed(0)
    first = dpsgd.gaussian_noise(torch.Size([8]), 1.0)
    torch.manual_seed(0)
    np.random.seed(0)
    assert not torch.equal(first, dpsgd.gaussian_noise(torch.Size([8]), 1.0))


@pytest.mark.unit
def test_a_mechanism_takes_an_epoch_of_batches_per_epoch() -> None:
    plan = dpsgd.mechanism(examples=479, epochs=3, batch_size=32, noise_multiplier=1.1, clip_norm=0.5)
    assert (plan.sample_rate, plan.steps) == (32 / 479, 3 * 15)
    assert dpsgd.mechanism(10, 1, 32, 1.0, 1.0).sample_rate == 1.0


@pytest.mark.unit
def test_the_ledger_composes_every_fit_and_survives_a_reload(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "shard_000", "ab" * 32)
    assert ledger.spends == [] and epsilon(ledger.spends, 1e-5) == 0.0
    ledger.record(ledger.with_steps(1.1, 0.0625, 45))
    ledger.record(ledger.with_steps(1.1, 0.0625, 45))  # the same mechanism: one entry
    ledger.record(ledger.with_steps(2.0, 0.0625, 10))
    again = Ledger(tmp_path, "shard_000", "ab" * 32)
    assert again.spends == [Spend(1.1, 0.0625, 90), Spend(2.0, 0.0625, 10)] and again.steps == 100
    mine = epsilon(again.spends, 1e-5)
    other = dp_accounting_epsilon([[1.1, 0.0625, 90], [2.0, 0.0625, 10]], 1e-5)
    assert mine == pytest.approx(other, rel=0.05)  # two RDP accountants, their own orders
    assert Ledger(tmp_path, "shard_000", "cd" * 32).spends == []  # other data: its own ledger


@pytest.mark.unit
def test_a_ledger_of_another_format_is_refused_not_misread(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "shard_000", "ab" * 32)
    ledger.path.write_text(json.dumps({"format": 2, "spends": [[1.0, 0.1, 10]]}))
    with pytest.raises(BadInput, match="is a privacy ledger of format 2, not 1: use the Flowerpot version"):
        Ledger(tmp_path, "shard_000", "ab" * 32)
    ledger.path.write_text("{")
    with pytest.raises(BadInput, match=r"cannot be read .*restore it from a backup"):
        Ledger(tmp_path, "shard_000", "ab" * 32)


@pytest.mark.unit
def test_the_privacy_report_keeps_each_sites_last_private_fit(tmp_path: Path) -> None:
    def fit(site: str, eps: float, steps: int) -> ClientEntry:
        metrics = {"privacy_epsilon": eps, "privacy_delta": 1e-5, "privacy_noise_multiplier": 1.1,
                   "privacy_clip_norm": 1.0, "privacy_sample_rate": 0.0625, "privacy_steps": steps,
                   "privacy_ledger": json.dumps([[1.1, 0.0625, steps]]),
                   "privacy_accountant": "opacus RDP"}  # fmt: skip
        return ClientEntry(site, "fit", 100, metrics, site, f"shard_{site[-1]}")

    def record(round_: int, clients: list[ClientEntry]) -> RoundRecord:
        return RoundRecord(round_, len(clients), 0, 0, 0, 0, None, None, None, None, 1.0, 1.0, 0.0, 0, 0, 0, {}, {},
                           clients)  # fmt: skip

    history = [record(1, [fit("site1", 0.5, 45), fit("site2", 0.6, 45)]), record(2, [fit("site1", 0.9, 90)])]
    lines = report_privacy(history, tmp_path, "record")
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert [(s["site"], s["epsilon"], s["steps"], s["round"]) for s in report["sites"]] == [
        ("site1", 0.9, 90, 2),
        ("site2", 0.6, 45, 1),
    ]
    assert (
        report["epsilon_max"] == 0.9 and report["delta"] == 1e-5 and report["sites"][0]["ledger"] == [[1.1, 0.0625, 90]]
    )
    assert lines == [
        f"privacy spent (DP=record, per site, opacus RDP): epsilon at most 0.900 at delta 1e-05 (site1/shard_1, "
        f"90 DP-SGD steps) over 2 sites' shards; in {tmp_path / 'privacy.json'}"
    ]
    assert report_privacy([record(1, [])], tmp_path / "none", "off") == []


def private_env(data: Path, tmp_path: Path, **overrides: str) -> dict[str, str]:
    address = free_address()
    return {
        "DATA_DIR": str(data),
        "DP_LEDGER_DIR": str(tmp_path / "ledgers"),
        "RESULTS_DIR": str(tmp_path / "results"),
        "SERVER_LISTEN_ADDRESS": address,
        "SERVER_ADDRESS": address,
        "NUM_SHARDS": "3",
        "NUM_ROUNDS": "3",
        "LOCAL_EPOCHS": "1",
        "MIN_AVAILABLE_CLIENTS": "3",
        "DP": "record",
        "DP_NOISE_MULTIPLIER": "1.1",
        "DP_CLIP_NORM": "1.0",
        "METRICS_PORT": "0",
        "START_TIMEOUT": "60",
        **overrides,
    }


def federate(spawn, env: dict[str, str], clients: int = 3) -> tuple[str, dict]:
    server = spawn(["server"], **env)
    server.wait_for("listening", timeout=30)
    procs = [spawn(["client"], **env) for _ in range(clients)]
    assert server.wait(timeout=300) == 0, server.output[-3000:]
    for proc in procs:
        assert proc.wait(timeout=60) == 0, proc.output[-3000:]
    return server.output, json.loads((Path(env["RESULTS_DIR"]) / "privacy.json").read_text())


def test_a_private_run_reports_an_epsilon_another_accountant_recomputes(spawn, digits_shards, tmp_path) -> None:
    output, report = federate(spawn, private_env(digits_shards, tmp_path, LOCAL_EPOCHS="2"))
    assert report["mode"] == "record" and report["delta"] == 1e-5 and "RDPAccountant" in report["accountant"]
    assert len(report["sites"]) == 3
    for site in report["sites"]:
        rate = 32 / site_examples(digits_shards, site["shard"])
        assert site["sample_rate"] == pytest.approx(rate)
        assert site["ledger"] == [[1.1, pytest.approx(rate), site["steps"]]]
        assert site["steps"] == 6 * -(
            -site_examples(digits_shards, site["shard"]) // 32
        )  # 3 rounds x 2 epochs' batches
        assert site["epsilon"] == pytest.approx(dp_accounting_epsilon(site["ledger"], 1e-5), rel=0.05)
        assert site["epsilon"] == pytest.approx(epsilon([Spend(*site["ledger"][0])], 1e-5), rel=1e-9)
    assert (
        "privacy spent (DP=record, per site, opacus.accountants.RDPAccountant (opacus 1.6.0)): epsilon at most"
        in output
    )
    history = json.loads((tmp_path / "results" / "history.json").read_text())
    eps = [r["fit_metrics"]["privacy_epsilon"] for r in history]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(max(s["epsilon"] for s in report["sites"]))
    assert history[-1]["eval_accuracy"] > 0.3  # private, and learning: chance is 0.1 (6 epochs in all)
    sites = json.loads((tmp_path / "results" / "sites.json").read_text())["clients"]  # the per-site view
    spent = {(s["site"], s["shard"]): s["epsilon"] for s in report["sites"]}
    assert len(sites) == 3 and all(c["privacy_epsilon"] == spent[(c["site"], c["shard"])] for c in sites)


def site_examples(data: Path, shard: str) -> int:
    return len(np.load(data / shard / "train.npz")["y"])


def test_the_ledger_adds_up_across_runs_and_a_budget_stops_training_at_it(spawn, digits_shards, tmp_path) -> None:
    """A second run on the same shards starts from the first's spend; a third, with a budget
    below what one more round would spend, declines every fit and ends with epsilon within it."""
    _, first = federate(spawn, private_env(digits_shards, tmp_path, NUM_ROUNDS="2"))
    _, second = federate(spawn, private_env(digits_shards, tmp_path, NUM_ROUNDS="2", RESULTS_DIR=str(tmp_path / "r2")))
    steps = {s["shard"]: s["steps"] for s in first["sites"]}
    for site in second["sites"]:
        assert site["steps"] == 2 * steps[site["shard"]]
        assert site["epsilon"] > next(s["epsilon"] for s in first["sites"] if s["shard"] == site["shard"])
    budget = min(s["epsilon"] for s in second["sites"]) + 0.001  # not enough for another round anywhere
    env = private_env(digits_shards, tmp_path, NUM_ROUNDS="2", RESULTS_DIR=str(tmp_path / "r3"),
                      DP_EPSILON_BUDGET=f"{budget}", MIN_COMPLETION_RATE="0")  # fmt: skip
    server = spawn(["server"], **env)
    server.wait_for("listening", timeout=30)
    clients = [spawn(["client"], **env) for _ in range(3)]
    code = server.wait(timeout=300)
    for proc in clients:
        proc.wait(timeout=60)
        assert "declines every further fit and still evaluates" in proc.output, proc.output[-2000:]
    history = json.loads((tmp_path / "r3" / "history.json").read_text())
    assert all(r["clients_trained"] == 0 for r in history), (code, server.output[-3000:])
    assert code == 7, server.output[-3000:]  # README's exit table: the last rounds all failed
    assert all(r["clients_evaluated"] == 3 for r in history)
    after = {s["shard"]: s["steps"] for s in second["sites"]}
    for ledger in (tmp_path / "ledgers").iterdir():  # nothing more was spent
        data = json.loads(ledger.read_text())
        assert sum(steps for _, _, steps in data["spends"]) == after[data["shard"]]


# --- client level (DP=client): the server's DP-FedAvg -------------------------------------------


@pytest.mark.unit
def test_client_level_noise_has_the_calibrated_deviation_over_the_expected_clients() -> None:
    """Noise multiplier 1.5 x clip norm 2, over the expected 10 sampled of 100: std 0.3."""
    dp = ClientLevel(noise_multiplier=1.5, clip_norm=2.0, sample_rate=0.1, delta=1e-5)
    center = np.zeros(200_000)
    noise = dp.noised(center, center, counted=0, connected=100)  # no update: the noise alone
    assert abs(noise.mean()) < 0.003 and abs(noise.std() / 0.3 - 1) < 0.01
    assert abs(float(((noise / 0.3) ** 4).mean()) - 3) < 0.1  # Gaussian, not a few draws summed
    mean = np.full(200_000, 0.4)  # 5 clipped updates answered of the expected 10: half the step
    step = dp.noised(center, mean, counted=5, connected=100)
    assert abs(step.mean() - 0.2) < 0.003 and abs(step.std() / 0.3 - 1) < 0.01


@pytest.mark.unit
def test_client_level_epsilon_agrees_with_opacus_and_the_budget_names_the_rounds_that_fit() -> None:
    from opacus.accountants import RDPAccountant

    dp = ClientLevel(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.1, delta=1e-5)
    opacus = RDPAccountant()
    opacus.history = [(1.0, 0.1, 50)]
    assert dp.epsilon(50) == pytest.approx(opacus.get_epsilon(1e-5), rel=0.05)
    assert dp.epsilon(0) == 0.0 and dp.epsilon(10) < dp.epsilon(50)
    budget = dp.epsilon(30) + 1e-6
    assert dp.check_budget(30, budget) == pytest.approx(dp.epsilon(30))
    with pytest.raises(BadInput, match=r"NUM_ROUNDS=50 at FRACTION_FIT=0.1 .*set NUM_ROUNDS at most 30,"):
        dp.check_budget(50, budget)


def private_strategy(**values: Any) -> GuardedStrategy:
    values = {"dp": "client", "dp_clip_norm": 1.0, "dp_noise_multiplier": 0.1, "fraction_fit": 0.5,
              "update_norm_limit": 1e6, **values}  # fmt: skip
    return build_strategy(Settings(**values), ndarrays_to_parameters([np.zeros(50_000, np.float32)]))


class _Manager:
    def __init__(self, connected: int) -> None:
        self.connected = connected

    def num_available(self) -> int:
        return self.connected

    def sample(self, num_clients: int, min_num_clients: int | None = None, criterion: Any = None) -> list:
        return []


@pytest.mark.unit
def test_client_level_clips_each_update_and_weighs_them_equally_whatever_their_counts() -> None:
    """Two updates (one 1,000 x too far, one claiming 1,000 examples) of the expected 0.5 x 4 = 2:
    each is clipped to norm 1 and counts once, and the noise is 0.1 x 1 / 2."""
    guarded = private_strategy()
    guarded.configure_fit(1, guarded.base, _Manager(connected=4))
    direction = (np.ones(50_000) / np.sqrt(50_000)).astype(np.float32)
    far = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([direction * 1000]), 1, {})
    big = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([-direction * 0.5]), 1_000, {})
    report = guarded.aggregate(1, [(named_proxy(0), far), (named_proxy(1), big)], [])
    got = parameters_to_ndarrays(report.parameters)[0].astype(np.float64)
    expected = (direction * 1.0 - direction * 0.5) / 2  # the clipped sum over the expected 2
    residual = got - expected
    assert abs(residual.std() / 0.05 - 1) < 0.02 and abs(residual.mean()) < 0.002
    assert report.refused == [] and report.failed is None


@pytest.mark.unit
def test_client_level_applies_a_round_without_updates_as_noise_alone() -> None:
    guarded = private_strategy()
    guarded.configure_fit(1, guarded.base, _Manager(connected=4))
    report = guarded.aggregate(1, [], [ValueError("a client failed")])
    got = parameters_to_ndarrays(report.parameters)[0]
    assert report.failed is None and abs(got.std() / 0.05 - 1) < 0.02
    # the round's spend, for the history and the live metrics
    assert report.metrics["privacy_epsilon"] == pytest.approx(guarded.client_dp.epsilon(1))  # type: ignore[union-attr]
    live = LiveMetrics(num_rounds=3)
    live.round_done({"round": 1, "fit_metrics": report.metrics})
    assert live.epsilon.labels(live.run_id)._value.get() == pytest.approx(report.metrics["privacy_epsilon"])


def test_a_client_level_run_reports_the_epsilon_dp_accounting_and_opacus_recompute(
    spawn, digits_shards, tmp_path
) -> None:
    from opacus.accountants import RDPAccountant

    env = private_env(digits_shards, tmp_path, DP="client", DP_NOISE_MULTIPLIER="0.5", DP_CLIP_NORM="2",
                      FRACTION_FIT="0.5", MIN_FIT_CLIENTS="1")  # fmt: skip
    output, report = federate(spawn, env)
    assert "DP=client: every round samples each client with probability 0.5 from a secure source" in output
    assert report["mode"] == "client" and report["steps"] == 3 and report["sample_rate"] == 0.5
    assert "dp-accounting 0.6.0" in report["accountant"] and report["sampling"] == "poisson, from os.urandom"
    recomputed = dp_accounting_epsilon([[0.5, 0.5, 3]], 1e-5)
    opacus = RDPAccountant()
    opacus.history = [(0.5, 0.5, 3)]
    assert report["epsilon"] == pytest.approx(recomputed, rel=0.05)  # its default orders, not ours
    assert report["epsilon"] == pytest.approx(opacus.get_epsilon(1e-5), rel=0.05)
    assert f"privacy spent (DP=client, per client, dp_accounting.rdp.RdpAccountant (dp-accounting 0.6.0)): " \
           f"epsilon {report['epsilon']:.3f} at delta 1e-05 after 3 rounds" in output  # fmt: skip
    history = json.loads((tmp_path / "results" / "history.json").read_text())
    assert len(history) == 3 and all(r.get("failed") is None for r in history)
    spent = [r["fit_metrics"]["privacy_epsilon"] for r in history]  # the run's spend, round by round
    assert spent == sorted(spent) and spent[0] > 0 and spent[-1] == pytest.approx(report["epsilon"])
    assert not (Path(env["DP_LEDGER_DIR"])).exists()  # the clients train as usual: no ledger


def test_a_client_level_round_that_samples_nobody_is_noise_alone_and_counted(spawn, digits_shards, tmp_path) -> None:
    """Poisson sampling picks nobody in most of these rounds (0.97 ** 3 per round): such a round
    still moves the model by the noise and spends its epsilon, as the accountant assumes."""
    env = private_env(digits_shards, tmp_path, DP="client", DP_NOISE_MULTIPLIER="0.5", DP_CLIP_NORM="2",
                      FRACTION_FIT="0.01", MIN_FIT_CLIENTS="1")  # fmt: skip
    _, report = federate(spawn, env)
    history = json.loads((tmp_path / "results" / "history.json").read_text())
    assert len(history) == 3 and all(r.get("failed") is None for r in history)
    spent = [r["fit_metrics"].get("privacy_epsilon") for r in history]
    assert None not in spent and spent == sorted(spent) and spent[-1] == pytest.approx(report["epsilon"])
    losses = [r["eval_loss"] for r in history]
    assert len(set(losses)) == 3  # every round's model is a new one: the noise was applied
