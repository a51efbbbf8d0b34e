"""`flowerpot bench`: run every measurement, then write results.json, report.md and plots."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import (
    accuracy,
    asynchrony,
    client_privacy,
    cross_device,
    cross_device_learning,
    deployment,
    overhead,
    privacy,
    report,
    robustness,
    round_cost,
    scale,
    secure_aggregation,
)
from shared.errors import BadInput

log = logging.getLogger("flowerpot.bench")


@dataclass(frozen=True)
class Plan:
    partitions: list[str]
    strategies: list[str]
    seeds: list[int]
    rounds: int
    epochs: int
    overhead_clients: list[int]
    overhead_rounds: int
    overhead_repeats: int
    local_ladder: list[int]
    compose_ladder: list[int]
    round_cost_rounds: int
    round_cost_repeats: int
    # Robustness under attack: clients, how many of them attack (2 of 10, a fifth of the
    # federation), the attacks, the partitions, seeds, rounds, local epochs, and the configurations
    # measured (None: all). The 0-attacker column is run once per partition and configuration.
    robustness_clients: int = 10
    robustness_attackers: int = 2
    robustness_attacks: tuple[str, ...] = robustness.COLUMNS
    robustness_partitions: tuple[str, ...] = ("iid", "dirichlet-0.5")
    robustness_seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    robustness_rounds: int = 10
    robustness_epochs: int = 2
    robustness_configs: tuple[str, ...] | None = None
    # Async against the sync baselines (bench/asynchrony.py): clients, partitions, levels of slow
    # clients, seeds of every row; the K x eta_g grid and its seeds (IID, one slow client, on
    # validation); rounds (client updates = rounds x clients in every row) of local epochs; the
    # chosen FedBuff again at big_clients with big_seeds (0: not).
    async_clients: int = 5
    async_partitions: tuple[str, ...] = ("iid", "pathological")
    async_slow: tuple[int, ...] = (0, 1)
    async_seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    async_grid_buffers: tuple[int, ...] = (1, 2, 5)
    async_grid_rates: tuple[float, ...] = (0.5, 1.0, 2.0)
    async_grid_seeds: tuple[int, ...] = (1, 2, 3)
    async_rounds: int = 20
    async_epochs: int = 1
    async_big_clients: int = 10
    async_big_seeds: tuple[int, ...] = (1, 2, 3)
    # Cross-device (bench/cross_device.py): connected clients of the capacity rows (the first also
    # all sampled), and the logical clients of one process whose memory is measured.
    cross_ladder: tuple[int, ...] = (100, 1000, 10_000)
    cross_memory: tuple[int, ...] = (1, 10, 100, 250)
    # Cross-device learning (bench/cross_device_learning.py): its cohorts and seeds.
    cross_learning: tuple[cross_device_learning.Cohort, ...] = cross_device_learning.COHORTS
    cross_learning_seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    # Differential privacy (bench/privacy.py): the frontier's cohorts, noise multipliers, seeds,
    # rounds and local epochs; the membership-inference set-up (None: not run) and its seeds.
    privacy_cohorts: tuple[privacy.Cohort, ...] = privacy.COHORTS
    privacy_noises: tuple[float, ...] = (0.5, 1.0, 2.0)
    privacy_seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    privacy_rounds: int = 5
    privacy_epochs: int = 3
    privacy_attack: privacy.Attack | None = privacy.ATTACK
    privacy_attack_seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    # Client-level DP (bench/client_privacy.py): its cohorts, noise multipliers and seeds.
    client_privacy_cohorts: tuple[cross_device_learning.Cohort, ...] = client_privacy.COHORTS
    client_privacy_noises: tuple[float, ...] = client_privacy.NOISES
    client_privacy_seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    # Secure aggregation (bench/secure_aggregation.py): the cost rows' clients, dropout shares and
    # rounds; the accuracy pairs' seeds, rounds and local epochs.
    secure_clients: tuple[int, ...] = secure_aggregation.CLIENTS
    secure_dropouts: tuple[float, ...] = secure_aggregation.DROPOUTS
    secure_rounds: int = 2
    secure_seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    secure_accuracy_rounds: int = 5
    secure_accuracy_epochs: int = 3

    def robustness_runs(self) -> int:
        """Federations the robustness section starts: per partition, the clean column and every attack's."""
        every = robustness.configurations(self.robustness_clients, self.robustness_attackers)
        configs = len(self.robustness_configs) if self.robustness_configs else len(every)
        cells = 1 + len(self.robustness_attacks)
        return configs * cells * len(self.robustness_seeds) * len(self.robustness_partitions)


# Clean FedAvg must converge before attacks can be compared: 10 rounds of 2 local epochs with 10
# clients reach 0.978 on seed 1 (5 rounds of 1 epoch: 0.74; 20 of 1: 0.92), about 2.5 s a run
# with warm clients. Every attack at 2 of 10 attackers, the target, on two partitions:
# 8 configurations x 9 columns x 5 seeds x 2 partitions = 720 federations.


FULL = Plan(
    partitions=list(accuracy.PARTITIONS),
    strategies=["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"],
    seeds=[1, 2, 3, 4, 5],
    rounds=5,
    epochs=3,
    overhead_clients=[3, 10, 30],
    overhead_rounds=16,
    overhead_repeats=2,
    local_ladder=[3, 10, 30, 50, 75, 100],
    compose_ladder=[3, 10, 30, 50, 75, 100],
    round_cost_rounds=200,
    round_cost_repeats=2,
)
QUICK = Plan(
    partitions=["iid"],
    strategies=["fedavg"],
    seeds=[1],
    rounds=2,
    epochs=1,
    overhead_clients=[3],
    overhead_rounds=4,
    overhead_repeats=1,
    local_ladder=[3],
    compose_ladder=[3],
    round_cost_rounds=12,
    round_cost_repeats=1,
    robustness_clients=5,
    robustness_attackers=1,
    robustness_attacks=("alie", "backdoor"),
    robustness_partitions=("iid",),
    robustness_seeds=(1,),
    robustness_rounds=1,
    robustness_epochs=1,
    robustness_configs=("fedavg (shipped)", "fedmedian"),
    async_clients=3,
    async_partitions=("iid",),
    async_slow=(1,),
    async_seeds=(1,),
    async_grid_buffers=(1, 3),
    async_grid_rates=(1.0,),
    async_grid_seeds=(1,),
    async_rounds=3,
    async_epochs=1,
    async_big_clients=0,
    async_big_seeds=(),
    cross_ladder=(20,),
    cross_memory=(1, 5),
    cross_learning=cross_device_learning.QUICK_COHORTS,
    cross_learning_seeds=(1,),
    privacy_cohorts=privacy.QUICK_COHORTS,
    privacy_noises=(1.0,),
    privacy_seeds=(1,),
    privacy_rounds=2,
    privacy_epochs=1,
    privacy_attack=privacy.Attack(rounds=2, epochs=2, noises=(1.0,)),
    privacy_attack_seeds=(1,),
    client_privacy_cohorts=client_privacy.QUICK_COHORTS,
    client_privacy_noises=(1.0,),
    client_privacy_seeds=(1,),
    secure_clients=(5,),
    secure_dropouts=(0.0, 0.3),
    secure_rounds=1,
    secure_seeds=(1,),
    secure_accuracy_rounds=2,
    secure_accuracy_epochs=1,
)

# The sections `--only` can pick, in the order they run; the Compose ones need a Docker engine.
SECTIONS = (
    "accuracy", "overhead", "round-cost", "scale", "deployment", "scale-compose", "robustness", "async", "cross-device",
    "cross-device-learning", "privacy", "client-privacy", "secure-aggregation",
)  # fmt: skip
COMPOSE_SECTIONS = ("deployment", "scale-compose")


def run(out: Path, quick: bool, compose: bool, command: str, docs: Path | None = None, only: str | None = None) -> Path:
    """Every section (without the Compose ones unless `compose`), or only the one named."""
    if only is not None and only not in SECTIONS:
        raise BadInput(f"--only {only!r} is not a section of the benchmark: use one of {', '.join(SECTIONS)}")
    plan = QUICK if quick else FULL
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    results: dict[str, Any] = {"command": command, "machine": machine(), "quick": quick}
    started = time.monotonic()
    p = plan
    steps = [
        (
            "accuracy",
            lambda: accuracy.measure(work / "accuracy", p.partitions, p.strategies, p.seeds, p.rounds, p.epochs, 3),
        ),
        (
            "overhead",
            lambda: overhead.measure(work / "overhead", p.overhead_clients, p.overhead_rounds, p.overhead_repeats),
        ),
        ("round-cost", lambda: round_cost.measure(work / "round-cost", p.round_cost_rounds, p.round_cost_repeats)),
        ("scale", lambda: {"local processes": scale.local_ladder(work / "scale", p.local_ladder)}),
        ("deployment", lambda: deployment.measure(work / "deployment", plan.overhead_rounds)),
        ("scale-compose", lambda: scale.compose_ladder(work / "scale-compose", plan.compose_ladder)),
        (
            "robustness",
            lambda: robustness.measure(
                work / "robustness",
                p.robustness_clients,
                p.robustness_attackers,
                list(p.robustness_attacks),
                list(p.robustness_partitions),
                list(p.robustness_seeds),
                p.robustness_rounds,
                p.robustness_epochs,
                list(p.robustness_configs) if p.robustness_configs else None,
            ),
        ),
        (
            "async",
            lambda: asynchrony.measure(
                work / "async",
                p.async_clients,
                list(p.async_partitions),
                list(p.async_slow),
                list(p.async_seeds),
                list(p.async_grid_buffers),
                list(p.async_grid_rates),
                list(p.async_grid_seeds),
                p.async_rounds,
                p.async_epochs,
                p.async_big_clients,
                p.async_big_seeds,
                warm=True,
            ),
        ),
        (
            "cross-device",
            lambda: cross_device.measure(work / "cross-device", list(p.cross_ladder), list(p.cross_memory)),
        ),
        (
            "cross-device-learning",
            lambda: cross_device_learning.measure(
                work / "cross-device-learning", p.cross_learning, list(p.cross_learning_seeds)
            ),
        ),
        (
            "privacy",
            lambda: privacy.measure(
                work / "privacy",
                p.privacy_cohorts,
                list(p.privacy_noises),
                list(p.privacy_seeds),
                p.privacy_rounds,
                p.privacy_epochs,
                p.privacy_attack,
                list(p.privacy_attack_seeds),
                grid=privacy.GRID if not quick else privacy.GRID[:1],
            ),
        ),
        (
            "client-privacy",
            lambda: client_privacy.measure(
                work / "client-privacy",
                p.client_privacy_cohorts,
                list(p.client_privacy_noises),
                list(p.client_privacy_seeds),
            ),
        ),
        (
            "secure-aggregation",
            lambda: secure_aggregation.measure(
                work / "secure-aggregation",
                list(p.secure_clients),
                list(p.secure_dropouts),
                p.secure_rounds,
                list(p.secure_seeds),
                p.secure_accuracy_rounds,
                p.secure_accuracy_epochs,
            ),
        ),
    ]
    steps = [(n, step) for n, step in steps if (n == only if only else compose or n not in COMPOSE_SECTIONS)]
    for number, (name, step) in enumerate(steps, 1):
        log.info("bench: section %d of %d: %s ...", number, len(steps), name)
        t0 = time.monotonic()
        value = step()
        if name == "scale-compose":
            results.setdefault("scale", {})["compose replicas"] = value
        else:
            results[name.replace("-", "_")] = value  # "async" stays "async"
        results.setdefault("section_seconds", {})[name] = time.monotonic() - t0
        log.info("bench: %s done in %.0f s", name, time.monotonic() - t0)
    results["seconds"] = time.monotonic() - started
    results["targets"] = targets(results)
    shutil.rmtree(work, ignore_errors=True)
    markdown = report.write(results, out)
    if docs is not None:
        publish(out, markdown, docs)
    return markdown


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    iid = results.get("accuracy", {}).get("partitions", {}).get("iid", {}).get("summary")
    if iid:
        gap = iid["centralized"] - iid["federated_fedavg"]
        measured = f"centralized {iid['centralized']:.4f}, federated {iid['federated_fedavg']:.4f}"
        found.append(
            {
                "target": "federated IID (FedAvg) within 1 point of centralized, equal total epochs, mean over seeds",
                "measured": f"{measured} (gap {gap * 100:+.2f} points)",
                "met": abs(gap) <= 0.01,
            }
        )
    three = next((r for r in results.get("overhead", []) if r["clients"] == 3), None)
    if three:
        ours = three["flowerpot"]["overhead_s"]["median"]
        found.append(
            {
                "target": "median framework overhead at most 1.1 x bare Flower's, 3 clients",
                "measured": f"{three['median_overhead_ratio']:.2f} x",
                "met": three["median_overhead_ratio"] <= 1.1,
            }
        )
        found.append({"target": "median framework overhead at most 25 ms per round, 3 clients",
                      "measured": f"{ours * 1000:.1f} ms", "met": ours <= 0.025})  # fmt: skip
    if "round_cost" in results:
        found += round_cost.targets(results["round_cost"])
    if "robustness" in results:
        found += robustness.targets(results["robustness"])
    if "async" in results:
        found += asynchrony.targets(results["async"])
    if "cross_device" in results:
        found += cross_device.targets(results["cross_device"])
    if "privacy" in results:
        found += privacy.targets(results["privacy"])
    if "secure_aggregation" in results:
        found += secure_aggregation.targets(results["secure_aggregation"])
    ladder = results.get("scale", {}).get("local processes")
    if ladder:
        largest = max((r["clients"] for r in ladder if r["ok"]), default=0)
        found.append(
            {
                "target": "30 client processes complete 3 rounds (largest found, tried up to 100)",
                "measured": f"largest completed: {largest} of {[r['clients'] for r in ladder]}",
                "met": largest >= 30,
            }
        )
    for kind, rows in results.get("scale", {}).items():
        peaks = [r["peak_pss_client_mb_max"] for r in rows if r.get("ok") and r.get("peak_pss_client_mb_max")]
        if peaks:
            found.append(
                {
                    "target": f"peak PSS at most 300 MB per client process ({kind}, torch {torch_build(kind)})",
                    "measured": f"{max(peaks):.0f} MB (largest over the ladder)",
                    "met": max(peaks) <= 300,
                }
            )
    return found


def torch_build(kind: str) -> str:
    """Local processes use this environment's torch; the client image has its own."""
    if kind == "compose replicas":
        from bench.compose import BUILT

        out = subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "python", BUILT["client"], "-c",
             "import importlib.metadata as m; print(m.version('torch'))"],
            capture_output=True, text=True,
        )  # fmt: skip
        return out.stdout.strip() or "?"
    import torch

    return torch.__version__


def machine() -> dict[str, Any]:
    import torch

    with open("/proc/cpuinfo") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    docker = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True)
    info = {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gb": round(memory_gb, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": importlib.metadata.version("flwr"),  # what is installed, never a number written here
        "docker_engine": docker.stdout.strip() or "n/a",
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }
    info["summary"] = (
        f"{info['cpus']} cores ({cpu}), {info['memory_gb']} GiB, Python {info['python']}, torch {info['torch']}, "
        f"flwr {info['flwr']}, Docker engine {info['docker_engine']}, {info['date']}"
    )
    return info


def publish(out: Path, markdown: Path, docs: Path) -> None:
    """docs/benchmarks.md: the report, with its plots beside it."""
    docs.parent.mkdir(parents=True, exist_ok=True)
    text = markdown.read_text()
    for plot in ("accuracy.png", "overhead.png", "robustness.png", "async.png", "cross-device.png"):
        if (out / plot).is_file():
            shutil.copy(out / plot, docs.parent / f"benchmark-{plot}")
            text = text.replace(f"]({plot})", f"](benchmark-{plot})")
    intro = (
        '# Benchmarks\n\nProduced by `flowerpot bench` (see README, "Benchmark"); the numbers below are its '
        "real output on the machine named. Timings on a shared 2-core machine are noisy: compare ratios measured "
        "side by side in one run, not absolute times across runs.\n\n"
    )
    notes = docs.with_name("benchmark-notes.md")  # the hand-written reading of the numbers
    docs.write_text(intro + text + ("\n" + notes.read_text() if notes.is_file() else ""))
