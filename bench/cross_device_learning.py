"""Cross-device learning: many small clients, a tenth of them per round, as the FedAvg paper
(McMahan et al. 2017) sets it up: C = 0.1, E = 5 local epochs, B = 10.

Cohorts: 100 clients on digits (IID, and the paper's pathological split: each shard 2 label
pieces) and 1,000 on the generated data set (IID), all logical clients of 4 processes
(CLIENTS_PER_PROCESS). Modes: sync (each round samples 10 % of the clients and waits for them)
and async (FedBuff's regime: CONCURRENCY = the same 10 % train at any time, BUFFER_SIZE K = 10,
eta_g = 1, the async section's choice on its validation grid; not re-tuned here). The same work
in both: `rounds` x the sampled clients' updates (async: as many versions of K).

Evaluation during the run is off (FRACTION_EVALUATE = 0) in both modes, so neither pays for it;
every version is kept (KEEP_ALL_MODELS) and evaluated here afterwards on the union of every
shard's test split, with the wall-clock time it was made (from the first round's start).
Reported per cohort and mode over the seeds (each seed its own partition, model and sampling):
seeds reaching the smoothed target (3 consecutive versions averaging at least it), rounds
(updates / the sampled clients) and seconds to it, final accuracy. No hyper-parameter is tuned
on test: the learning rate is the shipped one, the targets were set before the seeds ran.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.asynchrony import curve, reached, union
from bench.federation import prepare
from bench.report import mean_sd_text
from flowerpot.launcher import LocalFederation

log = logging.getLogger("flowerpot.bench")

FRACTION = 0.1  # C
LOCAL_EPOCHS = 5  # E
BATCH_SIZE = 10  # B
BUFFER = 10  # FedBuff's K
PROCESSES = 4


@dataclass(frozen=True)
class Cohort:
    name: str
    dataset: str
    clients: int
    partition: str
    # Set from one calibration seed (seed 0, not reported) of both modes: about where sync's
    # curve levels off within the rounds given (async: a tenth of the versions' updates each).
    target: float
    rounds: int

    def data_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"DATASET": self.dataset, "NUM_SHARDS": self.clients, "PARTITION": self.partition}
        if self.dataset == "digits":
            settings["MIN_SHARD_SIZE"] = 10  # 1,797 images in 100 shards: about 18 each
        else:
            settings["SYNTHETIC_EXAMPLES"] = 60 * self.clients
        if self.partition == "pathological":
            settings["LABELS_PER_CLIENT"] = 2
        return settings


COHORTS = (
    Cohort("100 clients, digits, IID", "digits", 100, "iid", 0.95, 40),
    Cohort("100 clients, digits, pathological", "digits", 100, "pathological", 0.85, 40),
    Cohort("1,000 clients, synthetic, IID", "synthetic", 1000, "iid", 0.95, 20),
)
QUICK_COHORTS = (Cohort("20 clients, digits, IID", "digits", 20, "iid", 0.5, 3),)


def mode_settings(mode: str, cohort: Cohort) -> dict[str, Any]:
    sampled = max(2, math.ceil(FRACTION * cohort.clients))
    if mode == "sync":
        return {"MODE": "sync", "NUM_ROUNDS": cohort.rounds}
    return {
        "MODE": "async",
        "CONCURRENCY": sampled,
        "BUFFER_SIZE": BUFFER,
        "SERVER_LEARNING_RATE": 1.0,
        "NUM_ROUNDS": math.ceil(cohort.rounds * sampled / BUFFER),  # versions: the same updates as sync
    }


def run_one(
    workdir: Path, data: Path, cohort: Cohort, mode: str, seed: int, extra: dict[str, Any] | None = None, tag: str = ""
) -> dict[str, Any]:
    """One run of `cohort` in `mode`; `extra` settings on top (tagged `tag` in its folder's name)."""
    run_dir = workdir / f"{cohort.dataset}-{cohort.clients}-{cohort.partition}-{mode}-{seed}{tag}"
    run_dir.mkdir(parents=True, exist_ok=True)
    each = math.ceil(cohort.clients / PROCESSES)
    env = {
        "DATA_DIR": data,
        "RESULTS_DIR": run_dir / "results",
        **cohort.data_settings(),
        "SEED": seed,
        "LOCAL_EPOCHS": LOCAL_EPOCHS,
        "BATCH_SIZE": BATCH_SIZE,
        "FRACTION_FIT": FRACTION,
        "MIN_FIT_CLIENTS": 2,
        "FRACTION_EVALUATE": 0,
        "MIN_EVALUATE_CLIENTS": 0,
        "MIN_AVAILABLE_CLIENTS": cohort.clients,
        "MAX_CLIENTS": cohort.clients,
        "CLIENTS_PER_PROCESS": each,
        "KEEP_ALL_MODELS": "true",
        "START_TIMEOUT": 1800,
        "CONNECT_TIMEOUT": 900,
        "ROUND_TIMEOUT": 900,
        **mode_settings(mode, cohort),
        **(extra or {}),
    }
    with LocalFederation(env, cwd=run_dir, log_dir=run_dir) as federation:
        federation.start_server(wait_seconds=120)
        for _ in range(PROCESSES):
            federation.start_client()
        code = federation.wait(timeout=3600, client_grace=60)
    row: dict[str, Any] = {"cohort": cohort.name, "mode": mode, "seed": seed, "ok": code == 0, "server_code": code}
    history_file = run_dir / "results" / "history.json"
    if code != 0 or not history_file.is_file():
        return row
    from client.data.shards import load_shard, shard_dirs

    shards = [load_shard(d) for d in shard_dirs(data)]
    history = json.loads(history_file.read_text())
    points, _ = curve(run_dir / "results", history, *union(shards, "test"), shards[0].spec, seed)
    sampled = max(2, math.ceil(FRACTION * cohort.clients))
    found = reached(points, cohort.target)
    row.update(
        curve=points,
        final=points[-1][1],
        seconds=points[-1][0],
        updates=int(points[-1][2]),
        seconds_to_target=found[0] if found else None,
        rounds_to_target=found[1] / sampled if found else None,
        trained_per_version=statistics.median(r["clients_trained"] for r in history),
    )
    return row


def cohort_data(workdir: Path, cohort: Cohort, seed: int) -> Path:
    """The cohort's shards for `seed` (its own partition), prepared once in `workdir`."""
    data = workdir / f"data-{cohort.dataset}-{cohort.clients}-{cohort.partition}-{seed}"
    if not data.is_dir():
        prepare(data, **cohort.data_settings(), SEED=seed)
    return data


def measure(workdir: Path, cohorts: tuple[Cohort, ...], seeds: list[int]) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    for cohort in cohorts:
        for seed in seeds:
            data = cohort_data(workdir, cohort, seed)
            for mode in ("sync", "async"):
                row = run_one(workdir, data, cohort, mode, seed)
                runs.append(row)
                log.info("bench: cross-device learning, %s, %s, seed %d: final %s, %s s to %.2f", cohort.name,
                         mode, seed, _f(row.get("final"), 4), _f(row.get("seconds_to_target"), 1),
                         cohort.target)  # fmt: skip
    return {
        "cohorts": [c.__dict__ for c in cohorts],
        "seeds": seeds,
        "fraction": FRACTION,
        "local_epochs": LOCAL_EPOCHS,
        "batch_size": BATCH_SIZE,
        "buffer": BUFFER,
        "processes": PROCESSES,
        "runs": runs,
    }


def _f(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for cohort in res["cohorts"]:
        for mode in ("sync", "async"):
            mine = [r for r in res["runs"] if r["cohort"] == cohort["name"] and r["mode"] == mode]
            done = [r for r in mine if r["ok"]]
            hit = [r for r in done if r.get("seconds_to_target") is not None]
            rows.append({
                "cohort": cohort["name"], "mode": mode, "target": cohort["target"], "runs": len(mine),
                "completed": len(done), "reached": len(hit),
                "rounds_to_target": [r["rounds_to_target"] for r in hit],
                "seconds_to_target": [r["seconds_to_target"] for r in hit],
                "final": [r["final"] for r in done], "seconds": [r["seconds"] for r in done],
            })  # fmt: skip
    return rows


def markdown(res: dict[str, Any]) -> str:
    header = ["cohort", "mode", "target", "completed", "reached target", "rounds to target", "seconds to target",
              "final accuracy %", "seconds (all rounds)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summary(res):
        lines.append("| " + " | ".join([
            s["cohort"], s["mode"], f"{s['target']:.2f}", f"{s['completed']}/{s['runs']}",
            f"{s['reached']}/{s['completed']}", mean_sd_text(s["rounds_to_target"], 1),
            mean_sd_text(s["seconds_to_target"], 1), mean_sd_text(s["final"], 1, 100), mean_sd_text(s["seconds"], 1),
        ]) + " |")  # fmt: skip
    return (
        "## Cross-device learning: a tenth of many clients per round\n\n"
        f"The FedAvg paper's setting: C = {res['fraction']:g}, E = {res['local_epochs']}, B = {res['batch_size']}; "
        f"logical clients in {res['processes']} processes. Sync samples C of the clients each round; async is "
        f"FedBuff with CONCURRENCY = C x clients, K = {res['buffer']}, eta_g = 1, and as many versions as make "
        "the same client updates. Evaluation is off during the run in both modes; each version is evaluated "
        "afterwards on every shard's test split. Rounds to target: client updates applied / the sampled clients "
        "(async: versions x K / (C x clients)), at the third of 3 consecutive versions averaging the target. "
        f"Seeds {res['seeds']} (each its own partition, model and sample), mean ± standard deviation over the "
        "seeds that reached the target (rounds, seconds) or completed (final).\n\n" + "\n".join(lines) + "\n"
    )
