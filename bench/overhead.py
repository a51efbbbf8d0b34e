"""Framework overhead per round: round wall time minus the slowest client's own work.

Measured for Flowerpot's server and, side by side in the same run, for Flower's bare
`start_server` with a plain FedAvg and the same clients: on a noisy machine only the ratio of
the two is comparable between runs.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from bench.federation import BenchRun, prepare, run_federation


def round_overheads(history: list[dict[str, Any]]) -> list[float]:
    """Per round (start to next start) minus max over clients of its train + evaluate seconds.

    The first round (start-up costs) and the last (no next start) are left out."""
    overheads = []
    for this, following in itertools.pairwise(history):
        own: dict[tuple[str, str, str], float] = {}
        for record in this["clients"]:
            seconds = record["metrics"].get("train_seconds" if record["phase"] == "fit" else "eval_seconds", 0.0)
            # Compose replicas share one name ("client"): their site (host) and shard tell them apart.
            who = (record["client"], record.get("site", ""), record.get("shard", ""))
            own[who] = own.get(who, 0.0) + float(seconds)
        overheads.append(following["started_at"] - this["started_at"] - max(own.values(), default=0.0))
    return overheads[1:]


def round_seconds(history: list[dict[str, Any]]) -> list[float]:
    return [b["started_at"] - a["started_at"] for a, b in itertools.pairwise(history)][1:]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": float("nan"), "p95": float("nan"), "samples": 0}
    return {"median": float(np.median(values)), "p95": float(np.percentile(values, 95)), "samples": len(values)}


def measure(workdir: Path, client_counts: list[int], rounds: int, repeats: int = 1) -> list[dict[str, Any]]:
    """For each client count: ours and the reference, same shards, same clients, same rounds;
    `repeats` times in alternating order (the machine drifts), samples pooled."""
    rows = []
    for clients in client_counts:
        data = workdir / f"data-{clients}"
        settings = {"DATA_DIR": data, "NUM_SHARDS": clients, "MIN_SHARD_SIZE": 10, "NUM_ROUNDS": rounds}
        prepare(data, **settings)
        common = {**settings, "MIN_FIT_CLIENTS": clients, "MIN_EVALUATE_CLIENTS": clients}
        samples: dict[str, dict[str, list[float]]] = {n: {"overhead": [], "round": []} for n in RUNS}
        ok = dict.fromkeys(RUNS, True)
        last: dict[str, BenchRun] = {}
        for repeat in range(repeats):
            order = list(RUNS.items()) if repeat % 2 == 0 else list(reversed(RUNS.items()))
            for name, reference in order:
                outcome = run_federation(workdir / f"{name}-{clients}-{repeat}", clients, common, reference=reference)
                ok[name] &= outcome.ok
                samples[name]["overhead"] += round_overheads(outcome.history)
                samples[name]["round"] += round_seconds(outcome.history)
                last[name] = outcome
        row: dict[str, Any] = {"clients": clients, "rounds": rounds, "repeats": repeats}
        for name in RUNS:
            row[name] = {
                "ok": ok[name],
                "overhead_s": summary(samples[name]["overhead"]),
                "round_s": summary(samples[name]["round"]),
            }
        ours, bare = row["flowerpot"]["overhead_s"]["median"], row["bare_flower"]["overhead_s"]["median"]
        row["median_overhead_ratio"] = ours / bare if bare > 0 else float("nan")
        row["communication"] = communication(last["flowerpot"].history)
        rows.append(row)
    return rows


RUNS = {"bare_flower": True, "flowerpot": False}  # name: is it the reference


def communication(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Bytes per round against the model's size times the messages that carry it."""
    if not history:
        return {}
    model_bytes = history[-1].get("model_bytes", 0)
    rounds = [
        {
            "round": r["round"],
            "bytes_sent": r["bytes_sent"],
            "bytes_received": r["bytes_received"],
            # the server sends the model with every fit and evaluate instruction, and receives it with every fit result
            "model_copies_sent": r["clients_trained"]
            + r["clients_failed"]
            + r["clients_evaluated"]
            + r["eval_failures"],
            "model_copies_received": r["clients_trained"] + r["updates_refused"],
        }
        for r in history
    ]
    for r in rounds:
        r["sent_over_model_x_copies"] = r["bytes_sent"] / max(1, model_bytes * r["model_copies_sent"])
        r["received_over_model_x_copies"] = r["bytes_received"] / max(1, model_bytes * r["model_copies_received"])
    return {"model_bytes": model_bytes, "per_round": rounds}
