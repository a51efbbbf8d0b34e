"""Robustness under attack: final accuracy of each aggregation, clean and under each attack, and
the backdoor's attack success rate, on IID and Dirichlet(0.5) shards.

Every run is a real federation (the project's launcher, real gRPC on loopback) of `clients`
clients on digits shards, every client pinned to its shard (SHARD_ID), the first `attackers` of
them running bench/attacker.py: the same shards attack in every row and every rerun. The
configurations are Flowerpot as shipped, each robust aggregator set for the number of attackers
measured: FedAvg with the update checks as shipped and with them off, FedMedian, FedTrimmedAvg,
multi-Krum, Bulyan (as far as the federation allows), FedAvg with norm clipping, and the
recommended configuration (RECOMMENDED, named in docs/security.md before it was measured). The
attacks are bench/attacker.py's, each as its paper defines it, and the backdoor of an attacker
who knows the median bound as shipped (BOUNDED). Clients are forked warm
(bench.warm.WarmPopen): what is measured is accuracy, not start-up.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from bench.accuracy import PARTITIONS
from bench.attacker import ATTACKS, COLLUDING, attack_success_rate
from bench.federation import prepare
from bench.report import noise, noise_sentence, save_figure, within_noise
from bench.warm import WarmPopen
from flowerpot.launcher import CLIENT, LocalFederation
from shared.settings import Settings

log = logging.getLogger("flowerpot.bench")

ATTACKER = ["-m", "bench.attacker"]
# The largest absolute bound Settings accepts and no median bound: no update is too far.
CHECKS_OFF = {"UPDATE_NORM_LIMIT": 1e9, "UPDATE_NORM_MEDIAN_MULTIPLE": 0}
# Norm clipping's bound, from honest updates only, not chosen against any attack: L2 norms of the
# 100 updates of a clean run of the full plan's shape (10 clients, digits IID, seed 1, 10 rounds of
# 2 local epochs, LOG_LEVEL=DEBUG's "update norm") were 0.36 to 1.56, median 0.78, 75th percentile
# 1.04: the bound is about the 75th percentile, so most honest updates pass unchanged.
CLIP_NORM = 1.0
# Named before it was measured (docs/security.md): a coordinate-wise trimmed mean that drops the
# attackers' share from each end, after every update is clipped to an honest norm. Trimming
# bounds what a few coordinates far from the rest can do (sign flip, noise, label flip); clipping
# bounds the length of any one update, which is what a scaled backdoor and the attacks that stay
# inside the honest spread (ALIE, IPM, min-max) need.
RECOMMENDED = "recommended: trimmed mean + clipping"
# The backdoor of an attacker who knows the median bound as shipped and boosts only up to it.
BOUNDED = "backdoor-bounded"
# The backdoor's target class and the attacks that are targeted (scored by success rate too).
TARGET = 0
TARGETED = ("backdoor", BOUNDED)
# Every column of the full plan: the attacks as bench/attacker.py defines them, and the bounded backdoor.
COLUMNS = (*ATTACKS, BOUNDED)


def configurations(clients: int, attackers: int) -> dict[str, dict[str, Any]]:
    """Each configuration's settings, the robust ones set for `attackers`."""
    f = max(attackers, 1)
    trim = {"STRATEGY": "fedtrimmedavg", "TRIM_FRACTION": min(0.49, (f + 0.5) / clients)}
    bulyan_f = min(f, (clients - 3) // 4)  # Bulyan needs n >= 4f + 3
    return {
        "fedavg (shipped)": {"STRATEGY": "fedavg"},
        "fedavg (checks off)": {"STRATEGY": "fedavg", **CHECKS_OFF},
        "fedmedian": {"STRATEGY": "fedmedian"},
        "fedtrimmedavg": trim,
        "multi-krum": {"STRATEGY": "krum", "KRUM_MALICIOUS_CLIENTS": f, "KRUM_CLIENTS_TO_KEEP": clients - f},
        f"bulyan (f={bulyan_f})": {"STRATEGY": "bulyan", "KRUM_MALICIOUS_CLIENTS": bulyan_f},
        "norm clipping": {"STRATEGY": "fedavg", "CLIP_NORM": CLIP_NORM},
        RECOMMENDED: {**trim, "CLIP_NORM": CLIP_NORM},
    }


def attack_args(attack: str, clients: int, attackers: int, run_dir: Path) -> list[str]:
    if attack == BOUNDED:
        multiple = Settings.load(None).update_norm_median_multiple  # the default, as shipped
        return ["--attack", "backdoor", "--under-median", f"{multiple:g}"]
    args = ["--attack", attack]
    if attack in COLLUDING:
        args += ["--collude", str(run_dir / "collusion"), "--colluders", str(attackers)]
    if attack == "backdoor" and attackers:
        # Model replacement's gamma = n / eta is one attacker's; k of them share the replacement,
        # each scaling by n / k (together they would otherwise overshoot k times).
        args += ["--scale", f"{clients / attackers:g}"]
    return args


def run_one(
    workdir: Path, clients: int, attackers: int, attack: list[str], settings: dict[str, Any], warm: bool = True,
    asr: bool = False,
) -> dict[str, float] | None:  # fmt: skip
    """Final accuracy (and with `asr` the backdoor's success rate) of one run, None when it failed;
    client i on shard i; clients forked warm (bench.warm.WarmPopen) unless `warm` is off."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        "RESULTS_DIR": workdir / "results",
        "MIN_AVAILABLE_CLIENTS": clients,
        "MIN_FIT_CLIENTS": clients,
        "MIN_EVALUATE_CLIENTS": clients,
        "MAX_CLIENTS": max(clients, 10),
        **settings,
    }
    federation = LocalFederation(env, cwd=workdir, log_dir=workdir, popen=WarmPopen if warm else None)
    with federation:
        federation.start_server()
        for i in range(clients):
            federation.start_client(i + 1, args=[*ATTACKER, *attack] if i < attackers else CLIENT, SHARD_ID=i)
        code = federation.wait(timeout=900, client_grace=60)
    history = workdir / "results" / "history.json"
    if code != 0 or not history.is_file():
        return None
    found = {"accuracy": json.loads(history.read_text())[-1]["eval_accuracy"]}
    if asr:
        found["asr"] = success_rate(workdir / "results" / "final_model.npz", Path(settings["DATA_DIR"]))
    return found


def success_rate(model_path: Path, data_dir: Path) -> float:
    """The backdoor's attack success rate of the final model on every shard's test split."""
    from client.data.shards import load_shard, shard_dirs
    from client.predict import load_predictor, predict_proba
    from client.tasks import load_task, to_input

    model, spec = load_predictor(model_path, data_dir, load_task())

    def predict(x: np.ndarray) -> np.ndarray:
        return predict_proba(model, to_input(x, spec)).argmax(1)

    hits = total = 0
    for folder in shard_dirs(data_dir):
        shard = load_shard(folder)
        h, t = attack_success_rate(predict, shard.x_test, shard.y_test, TARGET)
        hits, total = hits + h, total + t
    return hits / total


def measure(
    workdir: Path,
    clients: int,
    attackers: int,
    attacks: list[str],
    partitions: list[str],
    seeds: list[int],
    rounds: int,
    epochs: int,
    names: list[str] | None = None,
) -> dict[str, Any]:
    """Per partition, each configuration's final accuracy without attackers and with `attackers`
    of `clients` running each attack, over `seeds`; the backdoor's success rate beside it (and the
    clean runs' rate, the trigger's base rate)."""
    configs = configurations(clients, attackers)
    configs = {n: c for n, c in configs.items() if names is None or n in names}
    out: dict[str, Any] = {"clients": clients, "attackers": attackers, "rounds": rounds, "local_epochs": epochs,
                           "seeds": seeds, "recommended": RECOMMENDED, "partitions": {}}  # fmt: skip
    for partition in partitions:
        table: dict[str, dict[str, Any]] = {"clean": {}, **{a: {} for a in attacks}}
        for label in table:
            k = 0 if label == "clean" else attackers
            for name, config in configs.items():
                runs = []
                for seed in seeds:
                    data = workdir / f"data-{partition}-{seed}"
                    if not data.is_dir():
                        prepare(data, **PARTITIONS[partition], NUM_SHARDS=clients, SEED=seed)
                    base = {"DATA_DIR": data, "NUM_SHARDS": clients, "SEED": seed, "NUM_ROUNDS": rounds,
                            "LOCAL_EPOCHS": epochs}  # fmt: skip
                    run_dir = workdir / f"{partition}-{label}-{name.replace(' ', '_')}-{seed}"
                    scored = (label == "clean" and bool(set(attacks) & set(TARGETED))) or label in TARGETED
                    args = attack_args(label, clients, k, run_dir)
                    runs.append(run_one(run_dir, clients, k, args, {**base, **config}, asr=scored))
                    log.info("bench: robustness %s, %s, %s, seed %d: %s", partition, label, name, seed, runs[-1])
                table[label][name] = summary(runs)
        out["partitions"][partition] = table
    return out


def summary(runs: list[dict[str, float] | None]) -> dict[str, Any]:
    """Mean ± std over the seeds that finished; failed runs are counted, not hidden."""
    ok = [r for r in runs if r is not None]
    cell: dict[str, Any] = {"finals": [r["accuracy"] if r else None for r in runs], "failed": len(runs) - len(ok)}
    for key in ("accuracy", "asr"):
        values = [r[key] for r in ok if key in r]
        if values:
            cell[key] = values
            cell["mean" if key == "accuracy" else "asr_mean"] = statistics.mean(values)
            cell["std" if key == "accuracy" else "asr_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return cell


def ok(cell: dict[str, Any]) -> list[float]:
    """The finals of the seeds that finished."""
    return [f for f in cell.get("finals", []) if f is not None]


def reference(table: dict[str, Any]) -> list[float]:
    """Clean FedAvg as shipped, in one partition's table: the finals every cell is compared with."""
    return ok(table.get("clean", {}).get("fedavg (shipped)", {}))


def markdown(rob: dict[str, Any]) -> str:
    """One table per partition: configurations by attack, accuracy in points (mean ± std over
    seeds), and the backdoor's success rate."""
    text = [
        "## Robustness under attack\n",
        f"{rob['clients']} clients (digits), {rob['attackers']} of them attacking (shards 0 to "
        f"{rob['attackers'] - 1}, the same in every row), {rob['rounds']} rounds of {rob['local_epochs']} "
        f"local epoch(s), seeds {rob['seeds']}; "
        "final accuracy on every client's test split in points, mean ± std over seeds (failed runs counted apart); "
        "for the backdoor also its attack success rate (ASR: triggered test images not of the target class put in "
        "it; under clean, the trigger's rate without any attack). Attacks as bench/attacker.py defines them. "
        f"{noise_sentence(len(rob['seeds']))} Here ≈ marks a cell within noise of clean FedAvg (shipped). "
        f"The recommended configuration ({rob['recommended']}) was named before this run (docs/security.md).\n",
    ]
    for partition, table in rob["partitions"].items():
        clean = reference(table)
        labels = list(table)
        asr_of = [a for a in labels if a == "clean" or a in TARGETED]
        head = [*labels, *(f"{a} ASR" for a in asr_of)]
        lines = ["| configuration | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for name in table["clean"]:
            cells = []
            for label in labels:
                cell = table[label].get(name, {})
                if cell.get("mean") is None:
                    cells.append(f"all {cell.get('failed', 0)} runs failed" if cell.get("failed") else "-")
                    continue
                failed = f" ({cell['failed']} failed)" if cell["failed"] else ""
                own = label == "clean" and name == "fedavg (shipped)"
                same = "≈ " if clean and not own and within_noise(ok(cell), clean) else ""
                cells.append(f"{same}{cell['mean'] * 100:.1f} ± {cell['std'] * 100:.1f}{failed}")
            for label in asr_of:
                cell = table[label].get(name, {})
                has = cell.get("asr_mean") is not None
                cells.append(f"{cell['asr_mean'] * 100:.1f} ± {cell['asr_std'] * 100:.1f}" if has else "-")
            bold = "**" if name == rob["recommended"] else ""
            lines.append(f"| {bold}{name}{bold} | " + " | ".join(cells) + " |")
        text.append(f"### Partition: {partition}\n\n" + "\n".join(lines) + "\n")
    return "\n".join(text)


def plot(rob: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = list(rob["partitions"].items())
    fig, axes = plt.subplots(1, len(parts), figsize=(7 * len(parts), 4.2), squeeze=False)
    for ax, (partition, table) in zip(axes[0], parts):
        labels = list(table)
        for name in table["clean"]:
            means = [table[label].get(name, {}).get("mean") for label in labels]
            xs = [i for i, m in enumerate(means) if m is not None]
            ax.plot(xs, [means[i] for i in xs], marker="o", label=name, lw=2.5 if name == rob["recommended"] else 1)
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.set(title=f"{partition}: {rob['attackers']} of {rob['clients']} attacking", ylabel="final accuracy",
               ylim=(0, 1.02))  # fmt: skip
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def targets(rob: dict[str, Any]) -> list[dict[str, Any]]:
    """With the attackers, the recommended configuration within 5 points of clean FedAvg under
    every untargeted attack, and the backdoor's success rate under 10 %, per partition."""
    found = []
    name, k, n = rob["recommended"], rob["attackers"], rob["clients"]
    for partition, table in rob["partitions"].items():
        clean = reference(table)
        attacks = [a for a in table if a != "clean" and a not in TARGETED]
        gaps = {a: (statistics.mean(clean) - statistics.mean(ok(table[a][name]))) * 100
                for a in attacks if clean and ok(table[a].get(name, {}))}  # fmt: skip
        if gaps:
            worst = max(gaps, key=lambda a: gaps[a])
            found.append({
                "target": f"{partition}, {k} of {n} attacking: the recommended configuration within 5 points of "
                          "clean FedAvg under every untargeted attack",
                "measured": f"worst {worst}: {statistics.mean(ok(table[worst][name])) * 100:.1f} vs clean FedAvg "
                            f"{statistics.mean(clean) * 100:.1f} (gap {gaps[worst]:+.1f} points, noise "
                            f"{noise(clean, ok(table[worst][name])) * 100:.1f})",
                "met": gaps[worst] <= 5.0,
            })  # fmt: skip
        for attack in (a for a in table if a in TARGETED):
            cell = table[attack].get(name, {})
            if cell.get("asr_mean") is not None:
                found.append({
                    "target": f"{partition}, {k} of {n} attacking: the recommended configuration keeps the "
                              f"{attack} attack's success rate under 10 %",
                    "measured": f"{cell['asr_mean'] * 100:.1f} % ± {cell['asr_std'] * 100:.1f}",
                    "met": cell["asr_mean"] < 0.10,
                })  # fmt: skip
    return found
