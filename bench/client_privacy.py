"""Client-level differential privacy (DP=client, DP-FedAvg): where it is useless and where it
is not. The cross-device set-up of bench/cross_device_learning.py (C = 0.1 sampled a round from
a secure source, E = 5, B = 10, logical clients in 4 processes, evaluation afterwards on every
shard's test split) at 100 and 1,000 clients, and 3 clients as a cross-silo run (all sampled),
without DP and at noise multipliers NOISES, clip norm CLIP_NORM, delta DELTA; epsilon is the
run's, from its privacy.json.

The noise on the average is DP_NOISE_MULTIPLIER x DP_CLIP_NORM / (C x clients) per coordinate:
ten times smaller at 1,000 clients than at 100, and at 3 clients it swamps everything. Nothing
is tuned on test: the shipped learning rate, the clip norm set before the seeds ran.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bench.cross_device_learning import Cohort, cohort_data, run_one
from bench.report import mean_sd_text

log = logging.getLogger("flowerpot.bench")

NOISES = (0.5, 1.0)
CLIP_NORM = 1.0
DELTA = 1e-5
# 3 sites as cross-silo runs them (every site a round, the shipped E = 3, B = 32, 5 rounds):
# the cross-device E and B over a whole 480-image shard make 240 steps a round, where plain
# training already collapses at the shipped learning rate.
CROSS_SILO = {"FRACTION_FIT": 1.0, "LOCAL_EPOCHS": 3, "BATCH_SIZE": 32}
COHORTS = (
    Cohort("3 clients, digits, IID", "digits", 3, "iid", 0.95, 5),
    Cohort("100 clients, digits, IID", "digits", 100, "iid", 0.95, 40),
    Cohort("1,000 clients, synthetic, IID", "synthetic", 1000, "iid", 0.95, 20),
)
QUICK_COHORTS = (Cohort("20 clients, digits, IID", "digits", 20, "iid", 0.5, 3),)


def measure(workdir: Path, cohorts: tuple[Cohort, ...], noises: list[float], seeds: list[int]) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    for cohort in cohorts:
        for seed in seeds:
            data = cohort_data(workdir, cohort, seed)
            for noise in [None, *noises]:
                extra: dict[str, Any] = {"MIN_FIT_CLIENTS": 1, **(CROSS_SILO if cohort.clients <= 3 else {})}
                if noise is not None:
                    extra.update(DP="client", DP_NOISE_MULTIPLIER=noise, DP_CLIP_NORM=CLIP_NORM, DP_DELTA=DELTA)
                row = run_one(workdir, data, cohort, "sync", seed, extra, tag=f"-dp{noise}")
                row["noise"] = noise
                report = workdir / f"{cohort.dataset}-{cohort.clients}-{cohort.partition}-sync-{seed}-dp{noise}"
                privacy = report / "results" / "privacy.json"
                row["epsilon"] = json.loads(privacy.read_text())["epsilon"] if privacy.is_file() else None
                row.pop("curve", None)
                runs.append(row)
                log.info("bench: DP=client, %s, noise %s, seed %d: final %s, epsilon %s", cohort.name, noise, seed,
                         row.get("final"), row["epsilon"])  # fmt: skip
    return {"cohorts": [c.__dict__ for c in cohorts], "noises": noises, "seeds": seeds, "runs": runs}


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "## Client-level differential privacy (DP=client) at 3, 100 and 1,000 clients",
        "",
        f"DP-FedAvg: each round samples every client with probability 0.1 from a secure source, clips each update to "
        f"L2 norm {CLIP_NORM:g}, averages them with equal weights over the expected number sampled and adds noise of "
        f"the noise multiplier x the clip norm over that number; delta {DELTA:g}; epsilon from the run's "
        "privacy.json (dp-accounting's RDP). E = 5, B = 10, logical clients in 4 processes; final accuracy on every "
        f"shard's test split. Seeds {res['seeds']}, mean ± standard deviation over the seeds that completed.",
        "",
        "| cohort | rounds | DP | completed | epsilon at delta 1e-5 | final accuracy % | below non-private, points |",
        "|---|---|---|---|---|---|---|",
    ]
    for cohort in res["cohorts"]:
        base = [r["final"] for r in res["runs"] if r["cohort"] == cohort["name"] and r["noise"] is None and r["ok"]]
        for noise in [None, *res["noises"]]:
            mine = [r for r in res["runs"] if r["cohort"] == cohort["name"] and r["noise"] == noise]
            done = [r for r in mine if r["ok"] and r.get("final") is not None]
            finals = [r["final"] for r in done]
            eps = [r["epsilon"] for r in done if r["epsilon"] is not None]
            gap = "n/a"
            if noise is not None and finals and base:
                gap = f"{(sum(base) / len(base) - sum(finals) / len(finals)) * 100:+.1f}"
            lines.append(
                f"| {cohort['name']} | {cohort['rounds']} | {'off' if noise is None else f'client, noise {noise:g}'} "
                f"| {len(done)}/{len(mine)} | {'∞ (no DP)' if noise is None else mean_sd_text(eps, 2)} "
                f"| {mean_sd_text(finals, 1, 100)} | {gap} |"
            )
    return "\n".join(lines) + "\n"
