"""Per-round framework cost: two clients that train nothing, many rounds, ours against bare Flower.

With `bench.trivial_client` a round is pure framework time (send the model, aggregate, evaluate,
record), so any cost that grows with the run (e.g. a results writer that rewrites the whole
history every round) shows as a difference between an early and a late window of rounds. Both
servers run in the same benchmark, one after the other, with the same clients: on a noisy
machine only their ratio is comparable between runs.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np

from bench.federation import run_federation

CLIENTS = 2
TRIVIAL_CLIENT = ["-m", "bench.trivial_client"]
RUNS = {"bare_flower": True, "flowerpot": False}  # name: is it the reference

log = logging.getLogger("flowerpot.bench")


def windows(rounds: int) -> dict[str, tuple[int, int]]:
    """Rounds (first, last) whose start-to-next-start seconds are pooled: rounds 5-15 and the
    last ten before the final one for a long run; the halves of a short (quick) one. Round 1
    (start-up) and the last round (evaluates on every client, writes the final files) are out."""
    if rounds >= 40:
        return {"early": (5, 15), "late": (rounds - 10, rounds - 1)}
    half = max(2, rounds // 2)
    return {"early": (2, half), "late": (half + 1, rounds - 1)}


def per_round_seconds(history: list[dict[str, Any]]) -> dict[int, float]:
    """Round number -> seconds from its start to the next round's start."""
    return {a["round"]: b["started_at"] - a["started_at"] for a, b in itertools.pairwise(history)}


def measure(workdir: Path, rounds: int, repeats: int = 1) -> dict[str, Any]:
    """Each server `repeats` times, in the order bare, ours, ours, bare, ... (the load of a shared
    machine drifts; this way both see the same on average), samples pooled per window."""
    settings = {
        "NUM_ROUNDS": rounds,
        "MIN_AVAILABLE_CLIENTS": CLIENTS,
        "MIN_FIT_CLIENTS": CLIENTS,
        "MIN_EVALUATE_CLIENTS": CLIENTS,
    }
    spans = windows(rounds)
    row: dict[str, Any] = {"clients": CLIENTS, "rounds": rounds, "repeats": repeats, "windows": spans}
    samples: dict[str, dict[str, list[float]]] = {name: {w: [] for w in spans} for name in RUNS}
    ok = dict.fromkeys(RUNS, True)
    for repeat in range(repeats):
        order = list(RUNS.items()) if repeat % 2 == 0 else list(reversed(RUNS.items()))
        for name, reference in order:
            outcome = run_federation(
                workdir / f"{name}-{repeat}", CLIENTS, settings, reference=reference, timeout=max(300, rounds * 2),
                client_args=TRIVIAL_CLIENT,
            )  # fmt: skip
            ok[name] &= outcome.ok and len(outcome.history) == rounds
            seconds = per_round_seconds(outcome.history)
            for window, (first, last) in spans.items():
                samples[name][window] += [s for r, s in seconds.items() if first <= r <= last]
    for name in RUNS:
        entry: dict[str, Any] = {"ok": ok[name]}
        for window, values in samples[name].items():
            entry[f"{window}_ms"] = float(np.median(values)) * 1000 if values else float("nan")
            entry[f"{window}_samples"] = len(values)
        row[name] = entry
    ours, bare = row["flowerpot"], row["bare_flower"]
    for window in spans:
        row[f"{window}_ratio"] = _ratio(ours[f"{window}_ms"], bare[f"{window}_ms"])
    row["growth"] = _ratio(ours["late_ms"], ours["early_ms"])  # ours, late over early
    row["bare_growth"] = _ratio(bare["late_ms"], bare["early_ms"])
    for window, (first, last) in spans.items():
        log.info(
            "round cost, rounds %d-%d of %d: ours %.1f ms, bare Flower %.1f ms, ratio %.2f",
            first, last, rounds, ours[f"{window}_ms"], bare[f"{window}_ms"], row[f"{window}_ratio"],
        )  # fmt: skip
    return row


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def targets(row: dict[str, Any]) -> list[dict[str, Any]]:
    early, late = row["windows"]["early"], row["windows"]["late"]
    worst = max(row["early_ratio"], row["late_ratio"])
    where = f"rounds {early[0]}-{early[1]} and {late[0]}-{late[1]} of {row['rounds']}"
    return [
        {
            "target": f"per-round cost at most 1.2 x bare Flower's (ambition 1.1 x), 2 trivial clients, {where}",
            "measured": f"{row['early_ratio']:.2f} x and {row['late_ratio']:.2f} x",
            "met": worst <= 1.2,
        },
        {
            "target": f"per-round cost does not grow with the run (ours, {where}; at most 10 % more)",
            "measured": f"{row['flowerpot']['early_ms']:.1f} ms -> {row['flowerpot']['late_ms']:.1f} ms "
            f"({row['growth']:.2f} x; bare Flower {row['bare_growth']:.2f} x)",
            "met": row["growth"] <= 1.1,
        },
    ]
