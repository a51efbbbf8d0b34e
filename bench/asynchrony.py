"""Asynchronous (FedBuff, MODE=async) against synchronous (FedAvg) training with slow clients.

Both modes are measured the same way: every model version is saved during the run (KEEP_ALL_MODELS)
with its wall-clock time (when it was made: the record's start plus its fit_seconds, from the start
of the first round or version), and evaluated afterwards, here, on the union of all clients' test
splits. So neither mode pays for evaluation during the run (FRACTION_EVALUATE=0; the last version
is evaluated on every client in both, as always), and the curves are comparable point by point.

Same work: sync rounds of all N clients against an async buffer of N updates, NUM_ROUNDS each, so
both aggregate the same number of client updates (async also starts fits that finish after the
last version; they are wasted, and count as busy time). A slow client's fits take SLOWDOWN=4 times
as long as a fast one's (CLIENT_SLOWDOWN, on the training's CPU time). A client's idle time is the run's wall time
minus the seconds its own fits took (from its log), over the run's wall time.

On this machine N client processes share 2 cores: clients that train at the same time would slow
each other down, so every client emulates a device of its own (BASE_SLOWDOWN below).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from bench.federation import prepare
from bench.warm import WarmPopen
from flowerpot.launcher import LocalFederation

log = logging.getLogger("flowerpot.bench")

SLOWDOWN = 4.0  # a slow client's fits take this many times as long as a fast client's
# Every client emulates a device of its own: a fast client's fit takes BASE_SLOWDOWN x its real
# training time (CLIENT_SLOWDOWN), a slow one's BASE_SLOWDOWN x SLOWDOWN x. Without it N training
# processes on this machine's 2 cores slow each other down, which async (every client always
# busy) pays for and sync (the fast ones wait, idle) does not: measured with 5 clients, async's
# first version took 1.0 s against sync's first round's 0.3 s. With 4, 5 clients need about 1.25
# cores.
BASE_SLOWDOWN = 4.0
TARGET = 0.95
MODES = ("sync", "async")
FIT_LINE = re.compile(r"trained(?: on version \d+)? on \d+ examples, loss [\d.naninf]+, ([\d.]+) s")


def test_union(data: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    from client.data.shards import load_shard, shard_dirs

    shards = [load_shard(d) for d in shard_dirs(data)]
    return np.concatenate([s.x_test for s in shards]), np.concatenate([s.y_test for s in shards]), shards[0].spec


def curve(results: Path, x: np.ndarray, y: np.ndarray, spec: Any, seed: int) -> list[tuple[float, float]]:
    """(seconds since the first round started, accuracy on the union of test splits) per version."""
    import torch

    from client.tasks import evaluate_arrays, load_task, set_weights
    from shared.modelfile import load_model

    torch.set_num_threads(1)
    history = json.loads((results / "history.json").read_text())
    start = history[0]["started_at"]
    task = load_task()  # the built-in task
    model = task.new_model(spec, seed)
    points = []
    for record in history:
        arrays, _ = load_model(results / "models" / f"round_{record['round']:06d}.npz")
        set_weights(model, arrays)
        at = record["started_at"] + record["fit_seconds"] - start  # when the version was made
        points.append((at, evaluate_arrays(task, model, x, y, spec)["accuracy"]))
    return points


def idle_fractions(run_dir: Path, clients: int, seconds: float) -> list[float]:
    """Per client: 1 - (seconds its fits took) / (the run's wall time)."""
    fractions = []
    for i in range(1, clients + 1):
        text = (run_dir / f"client-{i}.log").read_text(errors="replace")
        busy = sum(float(m.group(1)) for m in FIT_LINE.finditer(text))
        fractions.append(max(0.0, 1.0 - busy / seconds) if seconds > 0 else 0.0)
    return fractions


def run_one(run_dir: Path, data: Path, mode: str, clients: int, slow: int, seed: int, rounds: int, epochs: int,
            warm: bool) -> dict[str, Any]:  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "DATA_DIR": data,
        "RESULTS_DIR": run_dir / "results",
        "NUM_SHARDS": clients,
        "SEED": seed,
        "NUM_ROUNDS": rounds,
        "LOCAL_EPOCHS": epochs,
        "MIN_AVAILABLE_CLIENTS": clients,
        "MIN_FIT_CLIENTS": clients,
        "MIN_EVALUATE_CLIENTS": 0,
        "FRACTION_EVALUATE": 0,
        "MAX_CLIENTS": max(clients, 10),
        "KEEP_ALL_MODELS": "true",
        "MODE": mode,
        "BUFFER_SIZE": clients,
    }
    with LocalFederation(env, cwd=run_dir, log_dir=run_dir, popen=WarmPopen if warm else None) as federation:
        federation.start_server()
        for i in range(clients):
            federation.start_client(CLIENT_SLOWDOWN=BASE_SLOWDOWN * (SLOWDOWN if i < slow else 1))
        code = federation.wait(timeout=1800)
    if code != 0:
        return {"ok": False, "server_code": code}
    x, y, spec = test_union(data)
    points = curve(run_dir / "results", x, y, spec, seed)
    reached = next((t for t, acc in points if acc >= TARGET), None)
    history = json.loads((run_dir / "results" / "history.json").read_text())
    return {
        "ok": True,
        "curve": points,
        "time_to_target": reached,
        "final": points[-1][1],
        "seconds": points[-1][0],
        "idle": idle_fractions(run_dir, clients, points[-1][0]),
        "staleness_mean": statistics.mean(r.get("staleness_mean") or 0.0 for r in history),
        "updates": sum(r["clients_trained"] for r in history),
    }


def measure(workdir: Path, clients: int, slow_levels: list[int], seeds: list[int], timing_seeds: int, rounds: int,
            epochs: int, warm: bool = False) -> dict[str, Any]:  # fmt: skip
    """Every level of slow clients with the first `timing_seeds` seeds (time to target), and the
    level without slow clients (where final accuracies are compared) with all `seeds`."""
    out: dict[str, Any] = {"clients": clients, "rounds": rounds, "local_epochs": epochs, "slowdown": SLOWDOWN,
                           "base_slowdown": BASE_SLOWDOWN, "target": TARGET, "seeds": seeds,
                           "timing_seeds": seeds[:timing_seeds], "runs": []}  # fmt: skip
    for n, seed in enumerate(seeds):
        data = workdir / f"data-{seed}"
        prepare(data, NUM_SHARDS=clients, SEED=seed)
        for slow in slow_levels:
            if slow > 0 and n >= timing_seeds:
                continue
            for mode in MODES:
                run = run_one(workdir / f"{mode}-{slow}-{seed}", data, mode, clients, slow, seed, rounds, epochs, warm)
                out["runs"].append({"seed": seed, "slow": slow, "mode": mode, **run})
                log.info("bench: async section, %s, %d slow, seed %d: time to %.2f %s s, final %s", mode, slow, seed,
                         TARGET, _f(run.get("time_to_target"), 1), _f(run.get("final"), 4))  # fmt: skip
    out["summary"] = summarize(out)
    return out


def summarize(out: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    levels = sorted({r["slow"] for r in out["runs"]})
    for slow in levels:
        row: dict[str, Any] = {"slow": slow}
        for mode in MODES:
            runs = [r for r in out["runs"] if r["slow"] == slow and r["mode"] == mode and r["ok"]]
            times = [r["time_to_target"] for r in runs if r["time_to_target"] is not None]
            row[mode] = {
                "runs": len(runs),
                "reached": len(times),
                "time": _stats(times),
                "final": _stats([r["final"] for r in runs]),
                "seconds": _stats([r["seconds"] for r in runs]),
                "idle": _stats([statistics.mean(r["idle"]) for r in runs]),
                "staleness": _stats([r["staleness_mean"] for r in runs]),
            }
        sync, fast = row["sync"]["time"]["mean"], row["async"]["time"]["mean"]
        row["speedup"] = sync / fast if sync and fast else None
        rows.append(row)
    return rows


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _f(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pm(stats: dict[str, float | None], digits: int, scale: float = 1.0) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean'] * scale:.{digits}f} ± {(stats['std'] or 0.0) * scale:.{digits}f}"


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "| slow clients | mode | time to " + f"{res['target']:.2f} (s) | reached | final accuracy (points) | "
        "run wall time (s) | idle (mean over clients) | mean staleness | speed-up (sync / async time) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["summary"]:
        for mode in MODES:
            m = row[mode]
            speedup = _f(row["speedup"], 2) + " x" if mode == "async" and row["speedup"] else ""
            lines.append(
                f"| {row['slow']} of {res['clients']} | {mode} | {_pm(m['time'], 1)} | {m['reached']}/{m['runs']} | "
                f"{_pm(m['final'], 1, 100)} | {_pm(m['seconds'], 1)} | {_pm(m['idle'], 2)} | "
                f"{_pm(m['staleness'], 2)} | {speedup} |"
            )
    return (
        "## Asynchronous training (FedBuff) against synchronous rounds\n\n"
        f"{res['clients']} clients (digits, IID), {res['rounds']} rounds or versions of {res['local_epochs']} local "
        f"epoch(s), the same number of client updates in both modes (sync: every client per round; async: "
        f"BUFFER_SIZE={res['clients']}); slow clients take {res['slowdown']:g} x as long per fit (CLIENT_SLOWDOWN). "
        f"Every version saved with its wall-clock time and evaluated afterwards on the union of all test splits; "
        f"time from the first round's start. Every client emulates a device of its own (fast clients "
        f"CLIENT_SLOWDOWN={res['base_slowdown']:g}, slow ones {res['base_slowdown'] * res['slowdown']:g}), so that "
        f"{res['clients']} processes on this machine's 2 cores do not slow each other down. Seeds {res['seeds']} "
        f"without slow clients, {res['timing_seeds']} with; mean ± std. Final accuracies closer than about "
        "1 point are within the noise of ~360 test images.\n\n" + "\n".join(lines) + "\n"
    )


def plot(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [row["slow"] for row in res["summary"]]
    fig, axes = plt.subplots(1, len(levels), figsize=(4.6 * len(levels), 3.8), squeeze=False)
    colours = {"sync": "tab:blue", "async": "tab:orange"}
    for ax, slow in zip(axes[0], levels):
        for run in res["runs"]:
            if run["slow"] != slow or not run["ok"]:
                continue
            t, acc = zip(*run["curve"])
            first = run["seed"] == res["seeds"][0]
            ax.plot(t, acc, color=colours[run["mode"]], alpha=0.9 if first else 0.35, lw=1.4 if first else 0.8,
                    label=run["mode"] if first else None)  # fmt: skip
        ax.axhline(res["target"], color="grey", ls=":", lw=1)
        ax.set(title=f"{slow} of {res['clients']} clients {res['slowdown']:g}x slow", xlabel="wall-clock seconds",
               ylabel="accuracy (all test splits)", ylim=(0.5, 1.0))  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {row["slow"]: row for row in res["summary"]}
    found = []
    one = rows.get(1)
    if one:
        found.append({
            "target": f"with 1 of {res['clients']} clients {res['slowdown']:g}x slow, async reaches {res['target']} "
                      "at least 2 x sooner than sync",
            "measured": f"{_f(one['speedup'], 2)} x (sync {_pm(one['sync']['time'], 1)} s, "
                        f"async {_pm(one['async']['time'], 1)} s)",
            "met": bool(one["speedup"] and one["speedup"] >= 2.0),
        })  # fmt: skip
    none = rows.get(0)
    if none:
        sync_t, async_t = none["sync"]["time"]["mean"], none["async"]["time"]["mean"]
        found.append({
            "target": f"no slow client: async reaches {res['target']} within 10 % of sync's time",
            "measured": f"async {_f(async_t, 1)} s, sync {_f(sync_t, 1)} s "
                        f"({_f(async_t / sync_t if async_t and sync_t else None, 2)} x)",
            "met": bool(async_t and sync_t and async_t <= 1.1 * sync_t),
        })  # fmt: skip
        sync_f, async_f = none["sync"]["final"]["mean"], none["async"]["final"]["mean"]
        gap = (sync_f - async_f) * 100 if sync_f is not None and async_f is not None else None
        found.append({
            "target": "no slow client: async's final accuracy within 1 point of sync's",
            "measured": f"async {_f(async_f, 4)}, sync {_f(sync_f, 4)} (gap {_f(gap, 2)} points)",
            "met": gap is not None and gap <= 1.0,
        })  # fmt: skip
    return found
