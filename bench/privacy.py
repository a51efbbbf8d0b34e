"""Differential privacy at the sites (DP=record): what it costs in accuracy at each epsilon, and
what it buys against membership inference.

The frontier: digits, 3 and 10 sites, IID and Dirichlet 0.5, FedAvg, for two models: the
built-in CNN and the small network of examples/digits_private (DP-SGD's noise grows with the
parameter count); DP-SGD at noise multipliers from 0.5 to 2 and at the noise that spends
TARGET_EPSILON exactly, against the same federation without DP. Batch size and learning rate are
tuned for each (cohort, model, private or not) on a grid, on the validation splits of a tuning
seed that is not reported (DP-SGD wants other values than plain SGD); the private cells are tuned
at TARGET_EPSILON, the budget the target names. Then every row runs on the reported seeds and is
measured on the test splits, and each private row is compared with the cohort's best non-private
one, whichever model it is (a practitioner would not give up the better model for nothing). Each
run has a fresh privacy ledger, so its epsilon is its own (at delta 1e-5, the most spent site's,
from privacy.json).

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

from bench.accuracy import PARTITIONS, shards_of
from bench.federation import prepare, run_federation
from bench.report import mean_sd_text
from bench.report import noise as noise_of

log = logging.getLogger("flowerpot.bench")

DELTA = 1e-5
CLIP_NORM = 1.0
TARGET_EPSILON = 8.0
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
class Model:
    name: str
    task: str = ""  # TASK, in TASK_DIR; empty: the built-in task

    @property
    def settings(self) -> dict[str, Any]:
        return {"TASK": self.task, "TASK_DIR": EXAMPLES / "digits_private"} if self.task else {}


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODELS = (Model("built-in CNN (53,002 parameters)"), Model("small MLP (2,410 parameters)", "small_mlp"))


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
    models: tuple[Model, ...] = MODELS,
) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": rounds, "local_epochs": epochs, "noises": noises, "seeds": seeds,
                           "grid": [list(c) for c in grid], "tune_seed": tune_seed, "target_epsilon": TARGET_EPSILON,
                           "delta": DELTA, "clip_norm": CLIP_NORM, "models": [m.name for m in models],
                           "cohorts": []}  # fmt: skip
    for cohort in cohorts:
        rows = []
        tuned: dict[str, Any] = {}
        for model in models:
            tuned[model.name] = {}
            for mode in ("off", "record"):
                scores = []
                for batch, lr in grid:
                    data = _data(workdir, cohort, tune_seed)
                    at = None if mode == "off" else calibrated_noise(data, batch, rounds, epochs)
                    tag = f"tune-{cohort.sites}-{cohort.partition}-{model.task or 'cnn'}-{mode}-{batch}-{lr}"
                    run = _run(workdir / tag, cohort, data, tune_seed, rounds, epochs, batch, lr, at, "validation",
                               model.settings)  # fmt: skip
                    scores.append({"batch": batch, "lr": lr, "noise": at, **run})
                    log.info("bench: privacy tuning, %s, %s, DP=%s, B=%d lr=%g: validation %s", cohort.name,
                             model.name, mode, batch, lr, _pct(run["accuracy"]))  # fmt: skip
                best = max(scores, key=lambda s: s["accuracy"] if s["accuracy"] is not None else -1)
                tuned[model.name][mode] = {"batch": best["batch"], "lr": best["lr"], "grid": scores}
            row_noises: list[float | str | None] = [None, *noises, TARGET]
            for noise in row_noises:
                cell = tuned[model.name]["off" if noise is None else "record"]
                runs = []
                for seed in seeds:
                    data = _data(workdir, cohort, seed)
                    z = calibrated_noise(data, cell["batch"], rounds, epochs) if isinstance(noise, str) else noise
                    label = "off" if noise is None else "target" if noise == TARGET else f"z{noise:g}"
                    run = _run(workdir / f"{cohort.sites}-{cohort.partition}-{model.task or 'cnn'}-{label}-{seed}",
                               cohort, data, seed, rounds, epochs, cell["batch"], cell["lr"], z, "test",
                               model.settings)  # fmt: skip
                    runs.append({"seed": seed, "noise": z, **run})
                    log.info("bench: privacy, %s, %s, %s, seed %d: test %s, epsilon %s", cohort.name, model.name,
                             "no DP" if z is None else f"noise {z:.3g}", seed, _pct(run["accuracy"]),
                             "n/a" if run["epsilon"] is None else f"{run['epsilon']:.2f}")  # fmt: skip
                rows.append({"model": model.name, "noise": noise, "batch": cell["batch"], "lr": cell["lr"],
                             "runs": runs})  # fmt: skip
        out["cohorts"].append({"name": cohort.name, "sites": cohort.sites, "partition": cohort.partition,
                               "tuned": tuned, "rows": rows})  # fmt: skip
    if attack is not None:
        out["attack"] = membership_inference(workdir / "attack", attack, attack_seeds)
    return out


TARGET = "target"  # the row at the noise that spends TARGET_EPSILON


def calibrated_noise(data: Path, batch: int, rounds: int, epochs: int) -> float:
    """The noise multiplier at which the most spent site spends TARGET_EPSILON at DELTA over the
    run, by the accountant the clients use. Every shard is calibrated: the smallest has the
    largest sample rate, but a larger one takes more steps, and either can spend more."""
    import math

    from opacus.accountants.utils import get_noise_multiplier

    sizes = {len(shard.y_train) for shard in shards_of(data)}
    return max(
        get_noise_multiplier(target_epsilon=TARGET_EPSILON, target_delta=DELTA, sample_rate=min(1.0, batch / n),
                             steps=rounds * epochs * math.ceil(n / batch), accountant="rdp")
        for n in sizes
    )  # fmt: skip


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
    """Per cohort and row: accuracies, epsilons, the gap to the cohort's best non-private row
    (of any model) and whether it is within noise."""
    found = []
    for cohort in res["cohorts"]:
        plains = [_values(row["runs"], "accuracy") for row in cohort["rows"] if row["noise"] is None]
        plain = max((p for p in plains if p), key=statistics.mean, default=[])
        for row in cohort["rows"]:
            acc = _values(row["runs"], "accuracy")
            eps = _values(row["runs"], "epsilon")
            gap = (statistics.mean(plain) - statistics.mean(acc)) * 100 if plain and acc else None
            tie = bool(plain and acc and row["noise"] is not None and gap is not None
                       and abs(gap) < 100 * noise_of(plain, acc))  # fmt: skip
            noises = [r["noise"] for r in row["runs"] if r.get("noise") is not None]
            found.append({"cohort": cohort["name"], "model": row.get("model", MODELS[0].name), "noise": row["noise"],
                          "noises": noises, "batch": row["batch"], "lr": row["lr"], "completed": len(acc),
                          "runs": len(row["runs"]), "accuracy": acc, "epsilon": eps, "gap_points": gap,
                          "within_noise": tie})  # fmt: skip
    return found


def _dp_text(row: dict[str, Any]) -> str:
    if row["noise"] is None:
        return "off"
    if row["noise"] == TARGET:
        spread = f"{min(row['noises']):.2f}" if len(set(row["noises"])) <= 1 else \
            f"{min(row['noises']):.2f}-{max(row['noises']):.2f}"  # fmt: skip
        return f"record, epsilon 8 (noise {spread})"
    return f"record, noise {row['noise']:g}"


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    rows = summary(res)
    for cohort in res["cohorts"]:
        private = [r for r in rows if r["cohort"] == cohort["name"] and r["noise"] is not None and r["epsilon"]
                   and max(r["epsilon"]) <= 8 and r["gap_points"] is not None]  # fmt: skip
        for model in [*res.get("models", []), None]:
            mine = [r for r in private if model is None or r["model"] == model]
            best = min(mine, key=lambda r: r["gap_points"], default=None)
            found.append({
                "target": f"{cohort['name']}, {model or 'any model'}: DP=record at epsilon <= 8 within 8 points of "
                          "the best non-private accuracy (ambition 5)",
                "measured": "no private row at epsilon <= 8" if best is None else
                            f"{best['model']}, {_dp_text(best)}: epsilon at most {max(best['epsilon']):.2f}, "
                            f"{best['gap_points']:+.1f} points below",
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
    header = ["cohort", "model", "DP", "B, lr (tuned)", "completed", "epsilon at delta 1e-5", "test accuracy %",
              "below the best non-private, points"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summary(res):
        gap = "n/a" if s["noise"] is None or s["gap_points"] is None else f"{s['gap_points']:+.1f}"
        if s["within_noise"]:
            gap += " ≈"
        lines.append("| " + " | ".join([
            s["cohort"], s["model"], _dp_text(s), f"{s['batch']}, {s['lr']:g}",
            f"{s['completed']}/{s['runs']}", mean_sd_text(s["epsilon"], 2) if s["epsilon"] else "∞ (no DP)",
            mean_sd_text(s["accuracy"], 1, 100), gap,
        ]) + " |")  # fmt: skip
    grid = ", ".join(f"B={b} lr={lr:g}" for b, lr in res["grid"])
    text = (
        "## Differential privacy: accuracy against epsilon, and membership inference\n\n"
        f"DP=record (DP-SGD at every site), digits, FedAvg, {res['rounds']} rounds of {res['local_epochs']} local "
        f"epochs, clip norm {res['clip_norm']:g}, delta {res['delta']:g}; epsilon is the most spent site's, from a "
        "fresh ledger per run. Two models: the built-in CNN and examples/digits_private/small_mlp.py. 'epsilon 8': "
        "the noise at which the run's most spent site spends epsilon 8 (Opacus' RDP accountant, the clients' own, "
        "over every shard). Batch size and learning rate tuned per cohort and model, with and without DP (at epsilon "
        f"{res.get('target_epsilon', 8):g} for every private row), on the validation splits of seed "
        f"{res['tune_seed']} (not reported) over {grid}; reported on the test splits of seeds {res['seeds']}, mean "
        "± standard deviation. Each private row is compared with the cohort's best non-private row, of either model. "
        "≈: within noise of it (two standard errors of the difference).\n\n" + "\n".join(lines) + "\n"
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
