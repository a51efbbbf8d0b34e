"""Differential privacy at the sites (DP=record): what it costs in accuracy at each epsilon, and
what it buys against membership inference.

The frontier: digits, 3 and 10 sites, IID and Dirichlet 0.5, FedAvg; DP-SGD at noise
multipliers from 0.5 to 2 against the same federation without DP. Batch size and learning rate
are tuned for each (cohort, private or not) on a grid, on the validation splits of a tuning seed
that is not reported (DP-SGD wants other values than plain SGD: larger batches, larger steps);
the private cells use the grid cell tuned at noise multiplier TUNE_NOISE. Then every row runs on
the reported seeds and is measured on the test splits. Each run has a fresh privacy ledger, so
its epsilon is its own (at delta 1e-5, the most spent site's, from privacy.json).

The attack: the loss-threshold membership inference of Yeom et al. 2018 ("Privacy risk in
machine learning: analyzing the connection to overfitting"): an example whose loss under the
final model is low is guessed a member. Its AUC over every threshold, with the shards' training
examples as members and their test examples as non-members, on a set-up that overfits (few
examples per site, many epochs): 0.5 is a coin, 1 is certainty.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.accuracy import PARTITIONS
from bench.federation import prepare, run_federation
from bench.report import mean_sd_text
from bench.report import noise as noise_of

log = logging.getLogger("flowerpot.bench")

DELTA = 1e-5
CLIP_NORM = 1.0
TUNE_NOISE = 1.0
UNLIMITED_NORM = 1e6
VALIDATION = 0.15
# (BATCH_SIZE, LEARNING_RATE): the shipped cell and larger batches and steps, as DP-SGD favours
GRID: tuple[tuple[int, float], ...] = ((32, 0.05), (32, 0.2), (64, 0.1))


@dataclass(frozen=True)
class Cohort:
    sites: int
    partition: str  # a key of bench.accuracy.PARTITIONS

    @property
    def name(self) -> str:
        return f"{self.sites} sites, {self.partition}"


COHORTS = (Cohort(3, "iid"), Cohort(3, "dirichlet-0.5"), Cohort(10, "iid"), Cohort(10, "dirichlet-0.5"))
QUICK_COHORTS = (Cohort(3, "iid"),)


@dataclass(frozen=True)
class Attack:
    """The membership-inference set-up: few examples per site, many epochs."""

    sites: int = 3
    # Of digits: 75 members and 75 non-members at TEST_FRACTION 0.5, 25 training examples a site,
    # so that a batch of 32 is the whole shard (sample rate 1: no amplification by sampling). On
    # seed 1, 400 examples over 10 x 10 epochs gave the non-private model an AUC of only 0.54
    # (digits generalise well); 150 over 20 x 20, 0.72.
    max_examples: int = 150
    rounds: int = 20
    epochs: int = 20
    # Noise 12 is where 400 full-batch steps spend about epsilon 8 at delta 1e-5.
    noises: tuple[float, ...] = (1.0, 4.0, 12.0)


ATTACK = Attack()


def measure(
    workdir: Path,
    cohorts: tuple[Cohort, ...],
    noises: list[float],
    seeds: list[int],
    rounds: int,
    epochs: int,
    attack: Attack | None,
    attack_seeds: list[int],
    grid: tuple[tuple[int, float], ...] = GRID,
    tune_seed: int = 0,
) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": rounds, "local_epochs": epochs, "noises": noises, "seeds": seeds,
                           "grid": [list(c) for c in grid], "tune_seed": tune_seed, "tune_noise": TUNE_NOISE,
                           "delta": DELTA, "clip_norm": CLIP_NORM, "cohorts": []}  # fmt: skip
    for cohort in cohorts:
        tuned: dict[str, Any] = {}
        for mode, noise in (("off", None), ("record", TUNE_NOISE)):
            scores = []
            for batch, lr in grid:
                data = _data(workdir, cohort, tune_seed)
                run = _run(workdir / f"tune-{cohort.sites}-{cohort.partition}-{mode}-{batch}-{lr}", cohort, data,
                           tune_seed, rounds, epochs, batch, lr, noise, "validation")  # fmt: skip
                scores.append({"batch": batch, "lr": lr, **run})
                log.info("bench: privacy tuning, %s, DP=%s, B=%d lr=%g: validation %s", cohort.name, mode, batch, lr,
                         _pct(run["accuracy"]))  # fmt: skip
            best = max(scores, key=lambda s: s["accuracy"] if s["accuracy"] is not None else -1)
            tuned[mode] = {"batch": best["batch"], "lr": best["lr"], "grid": scores}
        rows = []
        for noise in [None, *noises]:
            mode = "off" if noise is None else "record"
            cell = tuned[mode]
            runs = []
            for seed in seeds:
                data = _data(workdir, cohort, seed)
                label = "off" if noise is None else f"z{noise:g}"
                run = _run(workdir / f"{cohort.sites}-{cohort.partition}-{label}-{seed}", cohort, data, seed, rounds,
                           epochs, cell["batch"], cell["lr"], noise, "test")  # fmt: skip
                runs.append({"seed": seed, **run})
                log.info("bench: privacy, %s, %s, seed %d: test %s, epsilon %s", cohort.name,
                         "no DP" if noise is None else f"noise {noise:g}", seed, _pct(run["accuracy"]),
                         "n/a" if run["epsilon"] is None else f"{run['epsilon']:.2f}")  # fmt: skip
            rows.append({"noise": noise, "batch": cell["batch"], "lr": cell["lr"], "runs": runs})
        out["cohorts"].append({"name": cohort.name, "sites": cohort.sites, "partition": cohort.partition,
                               "tuned": tuned, "rows": rows})  # fmt: skip
    if attack is not None:
        out["attack"] = membership_inference(workdir / "attack", attack, attack_seeds)
    return out


def _data(workdir: Path, cohort: Cohort, seed: int) -> Path:
    data = workdir / f"data-{cohort.sites}-{cohort.partition}-{seed}"
    if not data.is_dir():
        prepare(data, **_data_settings(cohort, seed))
    return data


def _data_settings(cohort: Cohort, seed: int) -> dict[str, Any]:
    return {**PARTITIONS[cohort.partition], "NUM_SHARDS": cohort.sites, "SEED": seed,
            "VALIDATION_FRACTION": VALIDATION}  # fmt: skip


def _run(
    workdir: Path,
    cohort: Cohort,
    data: Path,
    seed: int,
    rounds: int,
    epochs: int,
    batch: int,
    lr: float,
    noise: float | None,
    split: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One federation: its final accuracy on `split` and its epsilon (None without DP)."""
    settings = {
        **_data_settings(cohort, seed), "DATA_DIR": data, "NUM_ROUNDS": rounds, "LOCAL_EPOCHS": epochs,
        "BATCH_SIZE": batch, "LEARNING_RATE": lr, "MIN_FIT_CLIENTS": cohort.sites,
        "MIN_EVALUATE_CLIENTS": cohort.sites, "EVALUATE_SPLIT": split, "DP": "off" if noise is None else "record",
        "DP_NOISE_MULTIPLIER": noise or 1.0, "DP_CLIP_NORM": CLIP_NORM, "DP_DELTA": DELTA,
        "DP_LEDGER_DIR": workdir / "ledgers", **(extra or {}),
    }  # fmt: skip
    run = run_federation(workdir, cohort.sites, settings, warm=True)
    accuracy = run.history[-1].get("eval_accuracy") if run.ok and run.history else None
    report = workdir / "results" / "privacy.json"
    epsilon = json.loads(report.read_text())["epsilon_max"] if noise is not None and report.is_file() else None
    return {"ok": run.ok, "split": split, "accuracy": accuracy, "epsilon": epsilon, "seconds": run.seconds}


def membership_inference(workdir: Path, attack: Attack, seeds: list[int]) -> dict[str, Any]:
    """The loss-threshold attack's AUC against the final model of each row and seed."""
    cohort = Cohort(attack.sites, "iid")
    rows = []
    for noise in [None, *attack.noises]:
        runs = []
        for seed in seeds:
            data = workdir / f"data-{seed}"
            settings = {"MAX_EXAMPLES": attack.max_examples, "TEST_FRACTION": 0.5, "VALIDATION_FRACTION": 0}
            if not data.is_dir():
                prepare(data, **{**_data_settings(cohort, seed), **settings})
            # At noise 4 and more on 25 examples a site the noise dominates every update: its norm
            # passes the default UPDATE_NORM_LIMIT (5 x the model's), which refused every private
            # update in a first run (docs/privacy.md). Raised for every row alike.
            settings["UPDATE_NORM_LIMIT"] = UNLIMITED_NORM
            run_dir = workdir / f"{'off' if noise is None else f'z{noise:g}'}-{seed}"
            run = _run(run_dir, cohort, data, seed, attack.rounds, attack.epochs, 32, 0.05, noise, "test", settings)
            run["auc"] = loss_threshold_auc(data, run_dir / "results" / "final_model.npz", seed) if run["ok"] else None
            runs.append({"seed": seed, **run})
            log.info("bench: membership inference, %s, seed %d: AUC %s, test %s, epsilon %s",
                     "no DP" if noise is None else f"noise {noise:g}", seed,
                     "n/a" if run["auc"] is None else f"{run['auc']:.3f}", _pct(run["accuracy"]),
                     "n/a" if run["epsilon"] is None else f"{run['epsilon']:.2f}")  # fmt: skip
        rows.append({"noise": noise, "runs": runs})
    return {"sites": attack.sites, "max_examples": attack.max_examples, "rounds": attack.rounds,
            "local_epochs": attack.epochs, "batch": 32, "lr": 0.05, "seeds": seeds, "rows": rows}  # fmt: skip


def loss_threshold_auc(data: Path, model_file: Path, seed: int) -> float:
    """ROC AUC of -loss: the shards' training examples (members) against their test examples."""
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from bench.accuracy import shards_of
    from client.tasks import load_task, set_weights, to_data
    from shared.modelfile import load_model

    shards = shards_of(data)
    spec = shards[0].spec
    model = load_task().new_model(spec, seed)
    set_weights(model, load_model(model_file)[0])
    model.eval()

    def losses(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        batch = to_data(x, y, spec)
        with torch.no_grad():
            return F.cross_entropy(model(batch.x), batch.y, reduction="none").numpy()

    members = np.concatenate([losses(s.x_train, s.y_train) for s in shards])
    others = np.concatenate([losses(s.x_test, s.y_test) for s in shards])
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(others))])
    return float(roc_auc_score(labels, -np.concatenate([members, others])))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f} %"


def _values(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in runs if r.get(key) is not None]


def summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Per cohort and row: accuracies, epsilons, the gap to the cohort's non-private row and
    whether it is within noise."""
    found = []
    for cohort in res["cohorts"]:
        plain = _values(cohort["rows"][0]["runs"], "accuracy")
        for row in cohort["rows"]:
            acc = _values(row["runs"], "accuracy")
            eps = _values(row["runs"], "epsilon")
            gap = (statistics.mean(plain) - statistics.mean(acc)) * 100 if plain and acc else None
            tie = bool(plain and acc and row["noise"] is not None and gap is not None
                       and abs(gap) < 100 * noise_of(plain, acc))  # fmt: skip
            found.append({"cohort": cohort["name"], "noise": row["noise"], "batch": row["batch"], "lr": row["lr"],
                          "completed": len(acc), "runs": len(row["runs"]), "accuracy": acc, "epsilon": eps,
                          "gap_points": gap, "within_noise": tie})  # fmt: skip
    return found


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    rows = summary(res)
    for cohort in res["cohorts"]:
        private = [r for r in rows if r["cohort"] == cohort["name"] and r["noise"] is not None and r["epsilon"]
                   and statistics.mean(r["epsilon"]) <= 8 and r["gap_points"] is not None]  # fmt: skip
        best = min(private, key=lambda r: r["gap_points"], default=None)
        found.append({
            "target": f"{cohort['name']}: DP=record at epsilon <= 8 within 8 points of non-private accuracy "
                      "(ambition 5)",
            "measured": "no private row at epsilon <= 8" if best is None else
                        f"noise {best['noise']:g}: epsilon {statistics.mean(best['epsilon']):.2f}, "
                        f"{best['gap_points']:+.1f} points below non-private",
            "met": best is not None and best["gap_points"] <= 8,
        })  # fmt: skip
    attack = res.get("attack")
    if attack:
        aucs = {row["noise"]: _values(row["runs"], "auc") for row in attack["rows"]}
        plain = aucs.get(None) or []
        for noise, values in aucs.items():
            if noise is None or not values or not plain:
                continue
            found.append({
                "target": f"membership inference: the private model's AUC (noise {noise:g}) within 0.05 of 0.5 where "
                          "the non-private one's is at least 0.6",
                "measured": f"non-private {statistics.mean(plain):.3f}, private {statistics.mean(values):.3f}",
                "met": statistics.mean(plain) >= 0.6 and abs(statistics.mean(values) - 0.5) <= 0.05,
            })  # fmt: skip
    return found


def markdown(res: dict[str, Any]) -> str:
    header = ["cohort", "DP", "B, lr (tuned)", "completed", "epsilon at delta 1e-5", "test accuracy %",
              "below non-private, points"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summary(res):
        gap = "n/a" if s["noise"] is None or s["gap_points"] is None else f"{s['gap_points']:+.1f}"
        if s["within_noise"]:
            gap += " ≈"
        lines.append("| " + " | ".join([
            s["cohort"], "off" if s["noise"] is None else f"record, noise {s['noise']:g}", f"{s['batch']}, {s['lr']:g}",
            f"{s['completed']}/{s['runs']}", mean_sd_text(s["epsilon"], 2) if s["epsilon"] else "∞ (no DP)",
            mean_sd_text(s["accuracy"], 1, 100), gap,
        ]) + " |")  # fmt: skip
    grid = ", ".join(f"B={b} lr={lr:g}" for b, lr in res["grid"])
    text = (
        "## Differential privacy: accuracy against epsilon, and membership inference\n\n"
        f"DP=record (DP-SGD at every site), digits, FedAvg, {res['rounds']} rounds of {res['local_epochs']} local "
        f"epochs, clip norm {res['clip_norm']:g}, delta {res['delta']:g}; epsilon is the most spent site's, from a "
        f"fresh ledger per run. Batch size and learning rate tuned per cohort, with and without DP (at noise "
        f"{res['tune_noise']:g} for every private row), on the validation splits of seed {res['tune_seed']} (not "
        f"reported) over {grid}; reported on the test splits of seeds {res['seeds']}, mean ± standard deviation. "
        "≈: within noise of the non-private row (two standard errors of the difference).\n\n" + "\n".join(lines) + "\n"
    )
    attack = res.get("attack")
    if attack:
        rows = ["| DP | completed | epsilon at delta 1e-5 | attack AUC | test accuracy % |", "|---|---|---|---|---|"]
        for row in attack["rows"]:
            eps = _values(row["runs"], "epsilon")
            rows.append("| " + " | ".join([
                "off" if row["noise"] is None else f"record, noise {row['noise']:g}",
                f"{len(_values(row['runs'], 'auc'))}/{len(row['runs'])}", mean_sd_text(eps, 1) if eps else "∞ (no DP)",
                mean_sd_text(_values(row["runs"], "auc"), 3), mean_sd_text(_values(row["runs"], "accuracy"), 1, 100),
            ]) + " |")  # fmt: skip
        text += (
            "\nThe loss-threshold membership-inference attack (Yeom et al. 2018) against the final model: "
            f"{attack['sites']} sites sharing {attack['max_examples']} digits images, half of them held out as "
            f"non-members, {attack['rounds']} rounds of {attack['local_epochs']} local epochs (B={attack['batch']}, "
            f"lr={attack['lr']:g}), seeds {attack['seeds']}; AUC 0.5 is a coin.\n\n" + "\n".join(rows) + "\n"
        )
    return text
