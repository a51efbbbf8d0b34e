"""The full benchmark's plan measures robustness on the grid its report needs, and its report says when two
numbers differ by less than the noise. No federation is run here: the plan and the report text."""

from __future__ import annotations

import pytest

from bench import robustness
from bench.attacker import ATTACKS
from bench.main import FULL, QUICK
from bench.report import accuracy_markdown, noise, run_error, within_noise

EIGHT = {"fedavg (shipped)", "fedavg (checks off)", "fedmedian", "fedtrimmedavg", "multi-krum", "bulyan (f=1)",
         "norm clipping", robustness.RECOMMENDED}  # fmt: skip


def test_full_robustness_plan_covers_the_issue() -> None:
    """2 of 10 attacking, every attack of the literature and a backdoor that knows the median
    bound, IID and Dirichlet(0.5), 5 seeds."""
    assert FULL.robustness_clients == 10 and FULL.robustness_attackers == 2
    assert set(FULL.robustness_attacks) == {*ATTACKS, robustness.BOUNDED}
    assert set(ATTACKS) == {"signflip", "gaussian", "labelflip", "alie", "ipm", "minmax", "minsum", "backdoor"}
    assert FULL.robustness_partitions == ("iid", "dirichlet-0.5")
    assert FULL.robustness_configs is None  # all of them
    # Bulyan needs n >= 4f + 3: with 10 clients it can be set for one attacker, not two
    assert set(robustness.configurations(FULL.robustness_clients, 2)) == EIGHT
    assert len(FULL.robustness_seeds) >= 5
    assert FULL.robustness_runs() == 8 * (1 + 9) * 5 * 2
    # enough training for clean FedAvg to converge (measured 0.978 on seed 1), not 5 rounds x 1 epoch
    assert FULL.robustness_rounds * FULL.robustness_epochs >= 20


def test_full_strategy_comparison_has_five_seeds_and_every_tuned_optimizer() -> None:
    assert len(FULL.seeds) >= 5
    assert {"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"} <= set(FULL.strategies)
    assert set(QUICK.strategies) <= set(FULL.strategies)


def test_noise_is_the_larger_of_the_spread_over_seeds_and_the_test_sets_binomial_error() -> None:
    assert round(run_error(0.98) * 100, 1) == 0.7 and round(run_error(0.95) * 100, 1) == 1.1
    same = [0.98] * 5  # five seeds that agree exactly are still measured on 360 images each
    assert 0.008 < noise(same, same) < 0.0095
    spread = [0.90, 0.98, 0.94, 0.99, 0.92]
    assert noise(spread, same) > noise(same, same)
    assert within_noise([0.980, 0.975, 0.985], [0.975, 0.970, 0.980])
    assert not within_noise([0.98] * 5, [0.95] * 5)


def accuracy_result(finals: dict[str, list[float]]) -> dict:
    curves = {s: [[0.5, f] for f in fs] for s, fs in finals.items()}
    return {
        "clients": 3,
        "rounds": 2,
        "local_epochs": 3,
        "seeds": [1, 2, 3, 4, 5],
        "partitions": {
            "iid": {
                "federated": curves,
                "centralized": [[0.5, 0.99]] * 5,
                "summary": {"local_only_own_test": 0.96, "local_only_all_tests": 0.96},
            }
        },
    }


def test_the_accuracy_report_marks_strategies_within_noise_of_the_best() -> None:
    text = accuracy_markdown(accuracy_result({
        "fedavg": [0.981, 0.978, 0.984, 0.975, 0.980],
        "fedadam": [0.979, 0.977, 0.982, 0.976, 0.978],  # 0.2 points lower: noise
        "fedprox": [0.93, 0.94, 0.92, 0.935, 0.925],  # 5 points lower: not noise
    }))  # fmt: skip
    row = next(line for line in text.splitlines() if line.startswith("| iid |"))
    assert "**0.9796 ± 0.0034**" in row and "≈ 0.9784" in row and "≈ 0.93" not in row
    assert "within noise" in text.lower() and "iid: fedadam ≈ fedavg" in text
    assert "0.7 points" in text  # the noise of one run is stated
    apart = accuracy_markdown(accuracy_result({"fedavg": [0.98] * 5, "fedprox": [0.90] * 5}))
    assert "Every strategy differs from its partition's best by more than the noise." in apart


def test_the_robustness_report_marks_cells_within_noise_and_judges_the_recommended_one() -> None:
    def cell(finals: list[float], asr: list[float] | None = None) -> dict:
        runs = [{"accuracy": f, **({"asr": a} if asr else {})} for f, a in zip(finals, asr or finals)]
        return robustness.summary(runs)

    name = robustness.RECOMMENDED
    table = {
        "clean": {"fedavg (shipped)": cell([0.97, 0.98, 0.96, 0.97, 0.98], [0.01] * 5),
                  name: cell([0.96, 0.97, 0.96, 0.97, 0.96], [0.02] * 5)},
        "alie": {"fedavg (shipped)": cell([0.1, 0.1, 0.09, 0.1, 0.11]), name: cell([0.97, 0.96, 0.97, 0.97, 0.96])},
        "backdoor": {"fedavg (shipped)": cell([0.97] * 5, [0.9] * 5), name: cell([0.96] * 5, [0.12] * 5)},
    }  # fmt: skip
    rob = {"clients": 10, "attackers": 2, "rounds": 10, "local_epochs": 2, "seeds": [1, 2, 3, 4, 5],
           "recommended": name, "partitions": {"iid": table}}  # fmt: skip
    text = robustness.markdown(rob)
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| ≈ 96.6 ± 0.5 |" in rows[f"| **{name}**"] and "≈ 10.0" not in rows["| fedavg (shipped)"]
    assert "| 97.2 ± 0.8 |" in rows["| fedavg (shipped)"]  # the reference itself is not marked
    assert rows["| fedavg (shipped)"].endswith("| 1.0 ± 0.0 | 90.0 ± 0.0 |")  # clean ASR, backdoor ASR
    assert "named before this run" in text
    untargeted, backdoor = robustness.targets(rob)
    assert untargeted["met"] and "worst alie: 96.6 vs clean FedAvg 97.2" in untargeted["measured"]
    assert not backdoor["met"] and backdoor["measured"].startswith("12.0 %")


def test_round_overheads_tell_replicas_of_one_name_apart() -> None:
    """Compose replicas all join as "client": the slowest one's seconds count, not their sum."""
    from bench.overhead import round_overheads

    def record(start: float, seconds: list[float]) -> dict:
        clients = [
            {"client": "client", "site": f"host{i}", "shard": f"shard_00{i}", "phase": "fit",
             "metrics": {"train_seconds": s}}
            for i, s in enumerate(seconds)
        ]  # fmt: skip
        return {"started_at": start, "clients": clients}

    history = [record(0.0, [0.1, 0.1]), record(1.0, [0.5, 0.9]), record(2.0, [0.5, 0.9]), record(3.0, [0.1])]
    assert round_overheads(history) == pytest.approx([0.1, 0.1])


def test_the_only_option_names_every_section() -> None:
    from bench.main import SECTIONS
    from flowerpot.cli import build_parser

    bench = build_parser()._subparsers._group_actions[0].choices["bench"]  # type: ignore[union-attr]
    (only,) = [a for a in bench._actions if "--only" in a.option_strings]
    assert all(section in only.help for section in SECTIONS), only.help
