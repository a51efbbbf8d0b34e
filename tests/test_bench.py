"""`flowerpot bench --quick`: every measurement in a small version, so the benchmark cannot rot.
It asserts what the numbers must be made of, never how fast anything is. The sections that
need a Docker engine are a test of their own (marked compose)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli


@pytest.mark.bench
def test_quick_benchmark_writes_every_figure(tmp_path: Path) -> None:
    args = ["bench", "--quick", "--no-compose", "--out", "out", "--docs", "docs/benchmarks.md"]
    result = run_cli(args, cwd=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())

    iid = results["accuracy"]["partitions"]["iid"]
    assert 0 < iid["summary"]["centralized"] <= 1 and 0 < iid["summary"]["federated_fedavg"] <= 1
    assert len(iid["federated"]["fedavg"][0]) == results["accuracy"]["rounds"]

    three = results["overhead"][0]
    assert three["clients"] == 3 and three["flowerpot"]["ok"] and three["bare_flower"]["ok"]
    assert three["flowerpot"]["overhead_s"]["samples"] >= 1 and three["bare_flower"]["overhead_s"]["samples"] >= 1
    # the model travels once per fit instruction, evaluate instruction and fit result
    for r in three["communication"]["per_round"]:
        assert 1.0 <= r["sent_over_model_x_copies"] < 1.01 and 1.0 <= r["received_over_model_x_copies"] < 1.01

    cost = results["round_cost"]  # two trivial clients: every round of both runs, early and late windows
    assert cost["flowerpot"]["ok"] and cost["bare_flower"]["ok"]
    assert all(cost[run][f"{w}_samples"] >= 1 for run in ("flowerpot", "bare_flower") for w in ("early", "late"))
    assert cost["early_ratio"] > 0 and cost["late_ratio"] > 0

    local = results["scale"]["local processes"][0]
    assert local["ok"] and local["peak_pss_server_mb"] > 10 and local["peak_pss_client_mb_max"] > 50
    assert {t["target"].split(" ")[0] for t in results["targets"]} >= {"federated", "median", "30", "peak", "per-round"}

    private = results["privacy"]["cohorts"][0]  # tuned on validation, then with and without DP on test
    assert {c["split"] for m in private["tuned"].values() for mode in m.values() for c in mode["grid"]} == {
        "validation"
    }
    # each model without DP, at noise 1 and at the noise that spends epsilon 8
    assert [(r["model"].split(" ")[1], r["noise"]) for r in private["rows"]] == [
        (model, noise) for model in ("CNN", "MLP") for noise in (None, 1.0, "target")
    ]
    runs = [r for row in private["rows"] for r in row["runs"]]
    assert all(r["ok"] and r["split"] == "test" and 0 < r["accuracy"] <= 1 for r in runs)
    assert all((r["epsilon"] is None) == (r["noise"] is None) for r in runs)
    assert all(r["epsilon"] <= 8 for row in private["rows"] if row["noise"] == "target" for r in row["runs"])
    assert all(0 <= r["auc"] <= 1 for row in results["privacy"]["attack"]["rows"] for r in row["runs"])
    client_level = results["client_privacy"]["runs"]  # 20 logical clients, without DP and at noise 1
    assert [(r["noise"], r["ok"]) for r in client_level] == [(None, True), (1.0, True)]
    assert client_level[0]["epsilon"] is None and client_level[1]["epsilon"] > 0
    secure = results["secure_aggregation"]  # the protocol's cost at 5 clients, and one seed's accuracy pair
    assert [(r["clients"], r["dropout"], r["ok"]) for r in secure["cost"]] == [(5, 0.0, True), (5, 0.3, True)]
    assert all(r["secure_round_s"] > 0 and r["plain_round_s"] > 0 for r in secure["cost"])
    assert [a["seed"] for a in secure["accuracy"]] == [1] and 0 < secure["accuracy"][0]["secure"] <= 1

    report = (out / "report.md").read_text()
    assert "## Framework overhead per round" in report and "## Accuracy at equal total local epochs" in report
    assert "## Differential privacy: accuracy against epsilon, and membership inference" in report
    assert "## Per-round cost with trivial clients" in report and "## Secure aggregation" in report
    assert (out / "accuracy.png").stat().st_size > 1000 and (out / "overhead.png").stat().st_size > 1000
    docs = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert docs.startswith("# Benchmarks") and "Command: `flowerpot bench --quick" in docs
    assert (tmp_path / "docs" / "benchmark-accuracy.png").is_file()
    assert not (out / "work").exists()  # scratch space is cleaned up


@pytest.mark.compose
def test_quick_benchmark_compose_sections(tmp_path: Path) -> None:
    results: dict = {}
    for section in ("deployment", "scale-compose"):
        result = run_cli(["bench", "--quick", "--only", section, "--out", section], cwd=tmp_path, timeout=1800)
        assert result.returncode == 0, result.stderr[-4000:]
        results.update(json.loads((tmp_path / section / "results.json").read_text()))
    deployment = results["deployment"]
    assert deployment["image_mb"]["flowerpot-server"] < deployment["image_mb"]["flowerpot-client"]
    assert 0 < deployment["default_job"]["up_to_first_round_s"] < deployment["default_job"]["total_s"]
    assert deployment["overhead_3_clients"]["flowerpot"]["ok"] and deployment["overhead_3_clients"]["bare_flower"]["ok"]
    assert results["scale"]["compose replicas"][0]["ok"]


@pytest.mark.bench
def test_only_runs_one_section_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    result = run_cli(["bench", "--only", "speed"], cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "bench-results").exists()
    assert result.stderr.strip().splitlines() == [
        "flowerpot bench: error: --only 'speed' is not a section of the benchmark: use one of accuracy, overhead, "
        "round-cost, scale, deployment, scale-compose, robustness, async, cross-device, cross-device-learning, "
        "privacy, client-privacy, secure-aggregation"
    ]
    result = run_cli(["bench", "--quick", "--only", "round-cost", "--out", "out"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) & {"accuracy", "overhead", "scale", "deployment"} == set()
    assert results["round_cost"]["flowerpot"]["ok"] and "round cost, rounds" in result.stderr


@pytest.mark.bench
def test_quick_robustness_section_runs_attackers_and_reports_them(tmp_path: Path) -> None:
    result = run_cli(["bench", "--quick", "--only", "robustness", "--out", "out"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rob = json.loads((tmp_path / "out" / "results.json").read_text())["robustness"]
    table = rob["partitions"]["iid"]
    assert set(table) == {"clean", "alie", "backdoor"}  # the colluding attack and the targeted one
    for column in table.values():
        assert set(column) == {"fedavg (shipped)", "fedmedian"}
        assert all(0 < cell["mean"] <= 1 and cell["failed"] == 0 for cell in column.values())
    assert all(0 <= cell["asr_mean"] <= 1 for label in ("clean", "backdoor") for cell in table[label].values())
    assert "asr_mean" not in table["alie"]["fedmedian"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Robustness under attack" in report and "| fedmedian |" in report and "backdoor ASR" in report
    assert (tmp_path / "out" / "robustness.png").stat().st_size > 1000


@pytest.mark.bench
def test_quick_async_section_compares_the_modes_on_saved_versions(tmp_path: Path) -> None:
    result = run_cli(["bench", "--quick", "--only", "async", "--out", "out"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())["async"]
    grid = {r["config"] for r in res["runs"] if r["part"] == "grid"}
    assert grid == {"FedAsync (K=1, eta_g=1)", "FedBuff (K=3, eta_g=1)"}
    assert all(r["split"] == "validation" for r in res["runs"] if r["part"] == "grid")  # tuned on validation
    main = {r["config"] for r in res["runs"] if r["part"] == "main"}
    assert main == {"sync", "sync, first 2 of 3", *grid, "async as shipped"}
    for run in res["runs"]:
        assert run["ok"], run
        times = [t for t, _, _ in run["curve"]]
        assert times == sorted(times) and all(0 < acc <= 1 for _, acc, _ in run["curve"])
        assert 0 <= run["idle_fast"] <= 1 and 0 <= run["idle_slow"] <= 1
        if run["config"] != "sync, first 2 of 3":  # over-selection drops the late answers
            assert run["updates"] >= res["clients"] * res["rounds"]  # the same work in every row
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Asynchronous training (FedBuff, FedAsync) against sync rounds and over-selection" in report
    assert "| iid | 1 of 3 | async as shipped |" in report
    assert "Took " in report and "(sections, minutes: async " in report  # how long the bench took
    assert (tmp_path / "out" / "async.png").stat().st_size > 1000
