"""The benchmark's report: every figure as JSON, the main ones as Markdown tables, and plots."""

from __future__ import annotations

import importlib
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The union of the shards' test splits on digits (20 % of 1,797 images): every accuracy in the
# accuracy and robustness sections is measured on about this many images.
TEST_IMAGES = 360


def run_error(accuracy: float, images: int = TEST_IMAGES) -> float:
    """The binomial standard error of one accuracy measured on `images` test images: 0.7 points
    at 98 %, 1.1 at 95 %."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / images)


def noise(a: Sequence[float], b: Sequence[float]) -> float:
    """Two standard errors of the difference of two means over seeds: below it, a difference is
    noise. Each mean's error is its spread over seeds over sqrt(seeds), the spread never taken
    smaller than one run's binomial error (a few seeds can agree by chance)."""

    def variance_of_mean(xs: Sequence[float]) -> float:
        spread = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return max(spread, run_error(statistics.mean(xs))) ** 2 / len(xs)

    return 2 * math.sqrt(variance_of_mean(a) + variance_of_mean(b))


def within_noise(a: Sequence[float], b: Sequence[float]) -> bool:
    return abs(statistics.mean(a) - statistics.mean(b)) < noise(a, b)


def noise_floor_points(seeds: int, accuracy: float = 0.98) -> float:
    """The smallest noise (points) between two means of `seeds` runs each at `accuracy`."""
    return 100 * 2 * math.sqrt(2 * run_error(accuracy) ** 2 / seeds)


def noise_sentence(seeds: int) -> str:
    return (
        f"Noise: one run's accuracy on ~{TEST_IMAGES} test images has a standard error of about 0.7 points at 98 % "
        f"(1.1 at 95 %); two means of {seeds} seeds that differ by less than twice the standard error of their "
        f"difference (at least {noise_floor_points(seeds):.1f} points, more where the seeds spread) are within "
        "noise, marked ≈."
    )


def write(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    plots = []
    if "accuracy" in results:
        plots.append(plot_accuracy(results["accuracy"], out / "accuracy.png"))
    if "overhead" in results or "scale" in results:
        plots.append(plot_overhead(results.get("overhead", []), results.get("scale", {}), out / "overhead.png"))
    if "robustness" in results:
        from bench import robustness

        plots.append(robustness.plot(results["robustness"], out / "robustness.png"))
    if "async" in results:
        from bench import asynchrony

        plots.append(asynchrony.plot(results["async"], out / "async.png"))
    if "cross_device" in results:
        from bench import cross_device

        plots.append(cross_device.plot(results["cross_device"], out / "cross-device.png"))
    markdown = out / "report.md"
    markdown.write_text(to_markdown(results, [p.name for p in plots]))
    return markdown


def fmt(value: Any, digits: int = 4, scale: float = 1.0, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return f"{value * scale:.{digits}f}{unit}"
    return str(value)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def to_markdown(results: dict[str, Any], plots: list[str]) -> str:
    parts = [f"Machine: {results['machine']['summary']}  \nCommand: `{results['command']}`\n"]
    if results.get("section_seconds"):
        took = ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in results["section_seconds"].items())
        parts.append(f"Took {results['seconds'] / 60:.1f} minutes in all (sections, minutes: {took}).\n")
    if results.get("quick"):
        parts.append(
            "Quick mode: a small version of every measurement, to check that the benchmark runs; "
            "its numbers do not speak to the targets.\n"
        )
    if "targets" in results:
        parts.append("## Targets\n\n" + table(
            ["target", "measured", "met"],
            [[t["target"], t["measured"], fmt(t["met"])] for t in results["targets"]],
        ))  # fmt: skip
    if "accuracy" in results:
        parts.append(accuracy_markdown(results["accuracy"]))
    if "overhead" in results:
        ms = lambda run, stat: fmt(run["overhead_s"][stat], 1, 1000)  # noqa: E731
        rows = [
            [str(r["clients"]), ms(r["flowerpot"], "median"), ms(r["flowerpot"], "p95"),
             ms(r["bare_flower"], "median"), ms(r["bare_flower"], "p95"),
             fmt(r["median_overhead_ratio"], 2), fmt(r["flowerpot"]["round_s"]["median"], 3)]
            for r in results["overhead"]
        ]  # fmt: skip
        parts.append(
            "## Framework overhead per round\n\nRound wall time (start to next start) minus the slowest client's own "
            "train + evaluate seconds, rounds 2 to N-1, local processes; bare Flower = `flwr.server.start_server` "
            "with a plain FedAvg and the same clients, measured in the same run.\n\n"
            + table(
                ["clients", "ours median ms", "ours p95 ms", "bare median ms", "bare p95 ms", "ratio", "ours round s"],
                rows,
            )
        )
    if "round_cost" in results:
        rc = results["round_cost"]
        rows = [
            [f"rounds {first}-{last}", fmt(rc["flowerpot"][f"{w}_ms"], 1), fmt(rc["bare_flower"][f"{w}_ms"], 1),
             fmt(rc[f"{w}_ratio"], 2)]
            for w, (first, last) in rc["windows"].items()
        ]  # fmt: skip
        parts.append(
            f"## Per-round cost with trivial clients\n\n{rc['clients']} clients that train nothing "
            f"(`bench/trivial_client.py`, like Flower's e2e-bare NumPyClient, arrays of the digits model's size), "
            f"{rc['rounds']} rounds, {rc.get('repeats', 1)} run(s) of each; median seconds from a round's start to the "
            f"next round's start, ours and bare "
            f"Flower (`start_server` + FedAvg) in the same run. Ours, late over early: {fmt(rc['growth'], 2)} x "
            f"(bare Flower {fmt(rc['bare_growth'], 2)} x).\n\n"
            + table(["window", "ours ms", "bare Flower ms", "ratio"], rows)
        )
    if "deployment" in results:
        dep = results["deployment"]
        over = dep["overhead_3_clients"]
        parts.append("## Deployment (Docker Compose)\n\n" + table(["figure", "value"], [
            ["server image", fmt(dep["image_mb"]["flowerpot-server"], 0, unit=" MB")],
            ["client image", fmt(dep["image_mb"]["flowerpot-client"], 0, unit=" MB")],
            ["build, layers cached", fmt(dep["build_s_cached"], 1, unit=" s")],
            ["`up` to the first round (3 replicas)", fmt(dep["default_job"]["up_to_first_round_s"], 1, unit=" s")],
            ["default job, `up` to the server's exit", fmt(dep["default_job"]["total_s"], 1, unit=" s")],
            ["default job's final accuracy", fmt(dep["default_job"]["final_accuracy"])],
            ["overhead median, 3 replicas: ours / bare Flower",
             f"{fmt(over['flowerpot']['overhead_s']['median'], 1, 1000)} / "
             f"{fmt(over['bare_flower']['overhead_s']['median'], 1, 1000)} ms "
             f"(ratio {fmt(over['median_overhead_ratio'], 2)})"],
        ]))  # fmt: skip
    if "scale" in results:
        for kind, rows in results["scale"].items():
            header = ["clients", "completed", "wall s", "mean round s", "server PSS MB", "client PSS MB max", "mean"]
            body = [
                [str(r["clients"]), r.get("skipped", fmt(r["ok"])), fmt(r.get("seconds"), 1), fmt(r.get("round_s"), 3),
                 fmt(r.get("peak_pss_server_mb"), 0), fmt(r.get("peak_pss_client_mb_max"), 0),
                 fmt(r.get("peak_pss_client_mb_mean"), 0)]
                for r in rows
            ]  # fmt: skip
            parts.append(f"## Scale: {kind}, 3 rounds\n\n" + table(header, body))
    if "overhead" in results:
        rows = []
        for r in results["overhead"]:
            comm = r["communication"]
            per = comm.get("per_round", [])
            if per:
                rows.append([
                    str(r["clients"]), fmt(comm["model_bytes"] / 1e3, 1, unit=" kB"),
                    fmt(float(np.median([p["bytes_sent"] for p in per])) / 1e6, 2, unit=" MB"),
                    fmt(float(np.median([p["bytes_received"] for p in per])) / 1e6, 2, unit=" MB"),
                    fmt(float(np.median([p["sent_over_model_x_copies"] for p in per])), 3),
                    fmt(float(np.median([p["received_over_model_x_copies"] for p in per])), 3),
                ])  # fmt: skip
        parts.append(
            "## Communication per round\n\nSerialized Flower messages at the server (no gRPC framing or TLS). "
            "The model travels with every fit and evaluate instruction and every fit result; the ratio is bytes over "
            "model size x those copies.\n\n"
            + table(
                ["clients", "model", "sent", "received", "sent / (model x copies)", "received / (model x copies)"], rows
            )
        )
    # The sections that write their own markdown, in the report's order (each module imported only
    # when its results are there: some import the server and the clients).
    for key, module in SECTION_MODULES.items():
        if key in results:
            parts.append(importlib.import_module(f"bench.{module}").markdown(results[key]))
    parts += [f"![{p}]({p})\n" for p in plots]
    return "\n".join(parts)


SECTION_MODULES = {  # results key: module of bench
    "robustness": "robustness",
    "async": "asynchrony",
    "cross_device": "cross_device",
    "cross_device_learning": "cross_device_learning",
    "privacy": "privacy",
    "client_privacy": "client_privacy",
    "secure_aggregation": "secure_aggregation",
}


def accuracy_markdown(acc: dict[str, Any]) -> str:
    """Final accuracy per partition and strategy, mean ± std over seeds; the best strategy of each
    partition in bold, the others marked ≈ when they are within noise of it."""
    strategies = list(next(iter(acc["partitions"].values()))["federated"]) if acc["partitions"] else []
    rows, ties = [], []
    for name, p in acc["partitions"].items():
        finals = {s: [c[-1] for c in curves if c] for s, curves in p["federated"].items()}
        done = {s: f for s, f in finals.items() if f}
        best = max(done, key=lambda s: statistics.mean(done[s])) if done else None
        cells = []
        for s in strategies:
            f = finals.get(s) or []
            if not f:
                cells.append("failed")
                continue
            failed = len(p["federated"][s]) - len(f)
            text = mean_std(f) + (f" ({failed} failed)" if failed else "")
            if s == best:
                text = f"**{text}**"
            elif best is not None and within_noise(f, done[best]):
                text = f"≈ {text}"
                ties.append(f"{name}: {s} ≈ {best}")
            cells.append(text)
        central = [c[-1] for c in p["centralized"]]
        rows.append([name, mean_std(central), *cells, fmt(p["summary"]["local_only_own_test"]),
                     fmt(p["summary"]["local_only_all_tests"])])  # fmt: skip
    seeds = len(acc["seeds"])
    verdict = (
        "Within noise of the partition's best (no ranking between them is supported): " + "; ".join(ties) + "."
        if ties
        else "Every strategy differs from its partition's best by more than the noise."
    )
    return (
        f"## Accuracy at equal total local epochs\n\n{acc['clients']} clients, {acc['rounds']} rounds x "
        f"{acc['local_epochs']} local epochs (centralized: the same {acc['rounds'] * acc['local_epochs']} epochs "
        f"on the union of the shards); final accuracy on the union of the test splits, mean ± std over seeds "
        f'{acc["seeds"]}; each strategy at its own tuned default (README, "Server-optimizer defaults"). '
        f"Best per partition in bold. Local only: each client trained alone, on its own test split and on "
        f"everyone's (mean over seeds).\n\n{noise_sentence(seeds)}\n\n"
        + table(["partition", "centralized", *strategies, "local only (own test)", "local only (all tests)"], rows)
        + f"\n{verdict}\n"
    )


def mean_sd_text(values: Sequence[float], digits: int, scale: float = 1.0) -> str:
    """`mean ± standard deviation` of `values` times `scale`, or n/a for none."""
    if not values:
        return "n/a"
    mean = statistics.mean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def mean_std(values: Sequence[float]) -> str:
    """`mean ± std` of accuracies, as fractions."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def save_figure(fig: Any, path: Path) -> Path:
    """Every benchmark plot's end: laid out, written at 90 dpi, closed (pyplot keeps it otherwise)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_accuracy(acc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partitions = list(acc["partitions"].items())
    fig, axes = plt.subplots(1, len(partitions), figsize=(4.2 * len(partitions), 3.8), squeeze=False)
    rounds = np.arange(1, acc["rounds"] + 1)
    for ax, (name, p) in zip(axes[0], partitions):
        ax.plot(rounds, np.mean(p["centralized"], axis=0), "k--", label="centralized")
        for strategy, curves in p["federated"].items():
            good = [c for c in curves if c]
            if good:
                ax.plot(rounds, np.mean(good, axis=0), marker="o", label=strategy)
        ax.axhline(p["summary"]["local_only_all_tests"], color="grey", linestyle=":", label="local only")
        ax.set(title=name, xlabel="round", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (union of test splits)")
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path)


def plot_overhead(overhead: list[dict[str, Any]], scale: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if overhead:
        clients = [r["clients"] for r in overhead]
        for name in ("flowerpot", "bare_flower"):
            left.plot(
                clients, [r[name]["overhead_s"]["median"] * 1000 for r in overhead], marker="o", label=f"{name} median"
            )
            left.plot(
                clients, [r[name]["overhead_s"]["p95"] * 1000 for r in overhead], linestyle="--", label=f"{name} p95"
            )
    left.set(title="Framework overhead per round", xlabel="clients", ylabel="ms")
    left.legend(fontsize=8)
    for kind, rows in scale.items():
        good = [r for r in rows if r.get("ok")]
        right.plot([r["clients"] for r in good], [r["round_s"] for r in good], marker="o", label=kind)
    right.set(title="Round time against clients (3 rounds)", xlabel="clients", ylabel="mean round seconds")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return save_figure(fig, path)
