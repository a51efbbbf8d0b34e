"""Asynchronous training (FedBuff, FedAsync) against the sync baselines a practitioner would use.

Rows, each a real federation over gRPC (server and client processes on this machine):
- sync: rounds that wait for every client (FedAvg);
- sync, over-selection: the round ends with the first FIT_QUORUM = (N-1)/N of the answers
  (Bonawitz et al. 2019's over-selection; late answers dropped, the late client not sampled again
  until it has answered);
- FedAsync (BUFFER_SIZE=1) and FedBuff (BUFFER_SIZE=K): K and SERVER_LEARNING_RATE (eta_g) picked
  from a grid on the validation splits (IID, one slow client, `grid_seeds`), reported on test;
- async as shipped: MODE=async with every other setting as .env ships it (its evaluation during the
  run, its buffer, concurrency and staleness); the benchmark sets only the clients, rounds and data.

Every row but the shipped one turns evaluation during the run off (FRACTION_EVALUATE=0), so that
neither mode pays for it; every row keeps each version (KEEP_ALL_MODELS) with the wall-clock time
it was made (the record's start plus its fit_seconds, from the start of the first round), and the
versions are evaluated here afterwards on the union of all clients' test splits (validation splits
for the grid). The same work in every row: `rounds` x N client updates (sync: `rounds` rounds of N;
async: rounds x N / K versions of K).

Fit durations: every client emulates a device of its own (BASE_SLOWDOWN x its real training time,
so that N processes on 2 cores do not slow each other down), each fit drawn from a log-normal
(CLIENT_SLOWDOWN_SPREAD=SPREAD, seeded), and the slow client 4x that (SLOWDOWN). Data: IID, and
the FedAvg paper's pathological split (2 label pieces per shard), where each shard, the slow one
(shard 0) too, holds classes the others lack.

Reported: time to a smoothed target (the third of 3 consecutive versions whose mean accuracy is at
least TARGET), client updates applied by then, accuracy at fixed wall-clock budgets, the final
accuracy, each client's idle share (1 - the seconds its fits took / the run's time), updates wasted
(dropped as stale or late), and the slow shard's own test accuracy beside the others'.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.federation import prepare
from bench.report import save_figure
from bench.warm import WarmPopen
from flowerpot.launcher import LocalFederation

log = logging.getLogger("flowerpot.bench")

SLOWDOWN = 4.0  # the slow client's fits take this many times as long as a fast client's
# Every client emulates a device of its own: a fast client's fit takes BASE_SLOWDOWN x its real
# training time (CLIENT_SLOWDOWN), a slow one's BASE_SLOWDOWN x SLOWDOWN x. Without it N training
# processes on this machine's 2 cores slow each other down, which async (every client always
# busy) pays for and sync (the fast ones wait, idle) does not: measured with 5 clients, async's
# first version took 1.0 s against sync's first round's 0.3 s. With 4, 5 clients need about 1.25
# cores.
BASE_SLOWDOWN = 4.0
SPREAD = 0.5  # log-normal sigma of each fit's duration: the slowest of 20 fits about 2.3 x the median
TARGET = 0.95
SMOOTH = 3  # consecutive versions averaged for the smoothed target
BUDGETS = (2.0, 4.0, 8.0)  # wall-clock seconds at which every row's accuracy is read
VALIDATION_FRACTION = 0.15  # of each shard's training examples, for the grid
PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": {"PARTITION": "iid"},
    "pathological": {"PARTITION": "pathological", "LABELS_PER_CLIENT": 2},
}
FIT_LINE = re.compile(r"trained(?: on version \d+)? on \d+ examples, loss [\d.naninf]+, ([\d.]+) s")


@dataclass(frozen=True)
class Config:
    name: str
    settings: dict[str, Any]
    buffer: int | None = None  # async: updates per version (None: sync, or as shipped)
    evaluates: bool = False  # evaluation during the run as shipped

    def versions(self, rounds: int, clients: int) -> int:
        per = self.buffer or (clients if self.settings.get("MODE") != "async" else SHIPPED_BUFFER)
        return max(1, math.ceil(rounds * clients / per))


SHIPPED_BUFFER = 2  # .env: BUFFER_SIZE empty = MIN_FIT_CLIENTS=2
QUIET = {"FRACTION_EVALUATE": 0, "MIN_EVALUATE_CLIENTS": 0}


def sync(clients: int) -> Config:
    return Config("sync", {"MODE": "sync", **QUIET})


def over_selection(clients: int) -> Config:
    quorum = math.floor((clients - 1) / clients * 1e4) / 1e4  # ceil(quorum x N) = N - 1, not N
    return Config(f"sync, first {clients - 1} of {clients}", {"MODE": "sync", "FIT_QUORUM": f"{quorum:.4f}", **QUIET})


def buffered(k: int, eta: float) -> Config:
    name = f"FedAsync (K=1, eta_g={eta:g})" if k == 1 else f"FedBuff (K={k}, eta_g={eta:g})"
    settings = {"MODE": "async", "BUFFER_SIZE": k, "SERVER_LEARNING_RATE": eta, **QUIET}
    return Config(name, settings, buffer=k)


SHIPPED = Config("async as shipped", {"MODE": "async"}, evaluates=True)


def union(shards: list[Any], split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of every shard's `split` (test or validation), as one set."""
    xs = [s.x_val if split == "validation" else s.x_test for s in shards]
    ys = [s.y_val if split == "validation" else s.y_test for s in shards]
    return np.concatenate(xs), np.concatenate(ys)


def curve(
    results: Path, history: list[dict[str, Any]], x: np.ndarray, y: np.ndarray, spec: Any, seed: int
) -> tuple[list[list[float]], Any]:
    """[seconds since the first round started, accuracy, client updates so far] per version, and
    the final model (to score per shard)."""
    import torch

    from client.tasks import evaluate_arrays, load_task, set_weights
    from shared.modelfile import load_model

    torch.set_num_threads(1)
    start = history[0]["started_at"]
    task = load_task()  # the built-in task
    model = task.new_model(spec, seed)
    points, updates = [], 0
    for record in history:
        arrays, _ = load_model(results / "models" / f"round_{record['round']:06d}.npz")
        set_weights(model, arrays)
        updates += record["clients_trained"]
        at = record["started_at"] + record["fit_seconds"] - start  # when the version was made
        points.append([at, evaluate_arrays(task, model, x, y, spec)["accuracy"], updates])
    return points, (task, model)


def reached(points: list[list[float]], target: float = TARGET, smooth: int = SMOOTH) -> tuple[float, int] | None:
    """(seconds, updates) at the third of the first `smooth` consecutive versions averaging >= target."""
    for i in range(smooth - 1, len(points)):
        if statistics.mean(p[1] for p in points[i - smooth + 1 : i + 1]) >= target:
            return points[i][0], int(points[i][2])
    return None


def at_budget(points: list[list[float]], seconds: float) -> float | None:
    made = [p[1] for p in points if p[0] <= seconds]
    return made[-1] if made else None


def idle_fractions(run_dir: Path, clients: int, seconds: float) -> list[float]:
    """Per client: 1 - (seconds its fits took) / (the run's wall time)."""
    fractions = []
    for i in range(1, clients + 1):
        text = (run_dir / f"client-{i}.log").read_text(errors="replace")
        busy = sum(float(m.group(1)) for m in FIT_LINE.finditer(text))
        fractions.append(max(0.0, 1.0 - busy / seconds) if seconds > 0 else 0.0)
    return fractions


def run_one(run_dir: Path, data: Path, config: Config, clients: int, slow: int, seed: int, rounds: int,
            epochs: int, split: str, warm: bool) -> dict[str, Any]:  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "DATA_DIR": data,
        "RESULTS_DIR": run_dir / "results",
        "NUM_SHARDS": clients,
        "SEED": seed,
        "NUM_ROUNDS": config.versions(rounds, clients),
        "LOCAL_EPOCHS": epochs,
        "MIN_AVAILABLE_CLIENTS": clients,
        "MAX_CLIENTS": max(clients, 10),
        "KEEP_ALL_MODELS": "true",
        "CLIENT_SLOWDOWN_SPREAD": SPREAD,
        **config.settings,
    }
    with LocalFederation(env, cwd=run_dir, log_dir=run_dir, popen=WarmPopen if warm else None) as federation:
        federation.start_server()
        for i in range(clients):  # client i on shard i: the slow ones hold shards 0..slow-1
            federation.start_client(SHARD_ID=i, CLIENT_SLOWDOWN=BASE_SLOWDOWN * (SLOWDOWN if i < slow else 1))
        code = federation.wait(timeout=1800)
    if code != 0:
        return {"ok": False, "server_code": code}
    from client.data.shards import load_shard, shard_dirs
    from client.tasks import evaluate_arrays

    shards = [load_shard(d) for d in shard_dirs(data)]
    spec = shards[0].spec
    history = json.loads((run_dir / "results" / "history.json").read_text())
    points, (task, model) = curve(run_dir / "results", history, *union(shards, split), spec, seed)
    seconds = points[-1][0]
    found = reached(points)
    per_shard = [evaluate_arrays(task, model, s.x_test, s.y_test, spec)["accuracy"] for s in shards]
    idle = idle_fractions(run_dir, clients, seconds)
    return {
        "ok": True,
        "curve": points,
        "time_to_target": found[0] if found else None,
        "updates_to_target": found[1] if found else None,
        "final": points[-1][1],
        "seconds": seconds,
        "budgets": [at_budget(points, b) for b in BUDGETS],
        "idle_fast": statistics.mean(idle[slow:]),
        "idle_slow": statistics.mean(idle[:slow]) if slow else None,
        "wasted": sum((r.get("updates_stale") or 0) + (r.get("updates_late") or 0) for r in history),
        "updates": int(points[-1][2]),
        "slow_shard": statistics.mean(per_shard[:slow]) if slow else None,
        "other_shards": statistics.mean(per_shard[slow:]),
    }


@dataclass
class Measurement:
    workdir: Path
    clients: int
    rounds: int
    epochs: int
    warm: bool
    runs: list[dict[str, Any]] = field(default_factory=list)
    prepared: set[tuple[int, str, int]] = field(default_factory=set)

    def data(self, seed: int, partition: str, clients: int) -> Path:
        path = self.workdir / f"data-{partition}-{clients}-{seed}"
        if (seed, partition, clients) not in self.prepared:
            prepare(path, NUM_SHARDS=clients, SEED=seed, VALIDATION_FRACTION=VALIDATION_FRACTION,
                    **PARTITIONS[partition])  # fmt: skip
            self.prepared.add((seed, partition, clients))
        return path

    def run(self, part: str, config: Config, partition: str, slow: int, seed: int, clients: int | None = None,
            split: str = "test") -> dict[str, Any]:  # fmt: skip
        n = clients or self.clients
        # n clients' shards are clients/n as large: as many epochs more keep a fit's work, and
        # so its duration against the framework's fixed costs, the same
        epochs = self.epochs * max(1, round(n / self.clients))
        name = re.sub(r"[^a-z0-9]+", "-", f"{part}-{config.name}-{partition}-{slow}-{n}-{seed}".lower())
        data = self.data(seed, partition, n)
        result = run_one(self.workdir / name, data, config, n, slow, seed, self.rounds, epochs, split, self.warm)
        row = {"part": part, "config": config.name, "partition": partition, "slow": slow, "clients": n,
               "seed": seed, "split": split, "epochs": epochs, **result}  # fmt: skip
        self.runs.append(row)
        log.info("bench: async, %s, %s, %s, %d of %d slow, seed %d: %s to %.2f (smoothed), final %s", part,
                 config.name, partition, slow, n, seed, _f(row.get("time_to_target"), 1), TARGET,
                 _f(row.get("final"), 4))  # fmt: skip
        return row


def measure(workdir: Path, clients: int, partitions: list[str], slow_levels: list[int], seeds: list[int],
            grid_buffers: list[int], grid_rates: list[float], grid_seeds: list[int], rounds: int, epochs: int,
            big_clients: int = 0, big_seeds: tuple[int, ...] = (), warm: bool = False) -> dict[str, Any]:  # fmt: skip
    """The grid (IID, one slow client, validation splits), then every row on test: each partition
    and level of slow clients with every seed; then, with `big_clients`, the chosen FedBuff
    against the sync rows at that size (IID, one slow client)."""
    m = Measurement(workdir, clients, rounds, epochs, warm)
    grid = [buffered(k, eta) for k in grid_buffers for eta in grid_rates]
    for config in grid:
        for seed in grid_seeds:
            m.run("grid", config, "iid", 1, seed, split="validation")
    ranked = rank(m.runs, grid)
    fedasync = next((c for c in ranked if c.buffer == 1), None)
    fedbuff = next((c for c in ranked if (c.buffer or 0) > 1), None)
    rows = [sync(clients), over_selection(clients), *(c for c in (fedasync, fedbuff) if c), SHIPPED]
    for partition in partitions:
        for slow in slow_levels:
            for seed in seeds:
                for config in rows:
                    m.run("main", config, partition, slow, seed)
    if big_clients and fedbuff is not None:
        # the chosen FedBuff as it is, and with its buffer grown with the clients (the same K / N)
        assert fedbuff.buffer is not None
        grown = buffered(round(fedbuff.buffer * big_clients / clients), fedbuff.settings["SERVER_LEARNING_RATE"])
        for seed in big_seeds:
            for config in (sync(big_clients), over_selection(big_clients), fedbuff, grown, SHIPPED):
                m.run("scale", config, "iid", 1, seed, clients=big_clients)
    out: dict[str, Any] = {
        "clients": clients, "rounds": rounds, "local_epochs": epochs, "slowdown": SLOWDOWN, "spread": SPREAD,
        "base_slowdown": BASE_SLOWDOWN, "target": TARGET, "smooth": SMOOTH, "budgets": list(BUDGETS),
        "seeds": seeds, "grid_seeds": grid_seeds, "partitions": partitions, "slow_levels": slow_levels,
        "grid": [c.name for c in grid], "chosen": {"fedasync": fedasync and fedasync.name,
                                                   "fedbuff": fedbuff and fedbuff.name},
        "big_clients": big_clients, "big_seeds": list(big_seeds), "runs": m.runs,
    }  # fmt: skip
    out["summary"] = summarize(m.runs)
    return out


def rank(runs: list[dict[str, Any]], grid: list[Config]) -> list[Config]:
    """The grid's cells, best first: most seeds reaching the smoothed target on validation, then
    the least mean time to it, then the best mean final validation accuracy."""

    def key(config: Config) -> tuple[float, float, float]:
        mine = [r for r in runs if r["part"] == "grid" and r["config"] == config.name and r["ok"]]
        times = [r["time_to_target"] for r in mine if r["time_to_target"] is not None]
        final = statistics.mean(r["final"] for r in mine) if mine else 0.0
        return (-len(times), statistics.mean(times) if times else math.inf, -final)

    return sorted(grid, key=key)


STATS = ("time_to_target", "updates_to_target", "final", "seconds", "idle_fast", "idle_slow", "wasted",
         "slow_shard", "other_shards")  # fmt: skip


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (part, partition, slow, clients, config), in the order they ran."""
    keys: list[tuple[Any, ...]] = []
    for r in runs:
        key = (r["part"], r["partition"], r["slow"], r["clients"], r["config"])
        if key not in keys:
            keys.append(key)
    rows = []
    for key in keys:
        mine = [r for r in runs if (r["part"], r["partition"], r["slow"], r["clients"], r["config"]) == key]
        ok = [r for r in mine if r["ok"]]
        row: dict[str, Any] = dict(zip(("part", "partition", "slow", "clients", "config"), key))
        row.update(runs=len(mine), ok=len(ok), reached=sum(r["time_to_target"] is not None for r in ok))
        for name in STATS:
            row[name] = _stats([r[name] for r in ok if r.get(name) is not None])
        row["budgets"] = [_stats([r["budgets"][i] for r in ok if r["budgets"][i] is not None])
                          for i in range(len(BUDGETS))]  # fmt: skip
        rows.append(row)
    return rows


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.mean(values), "std": std, "n": len(values)}


def _f(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pm(stats: dict[str, Any], digits: int, scale: float = 1.0) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean'] * scale:.{digits}f} ± {(stats['std'] or 0.0) * scale:.{digits}f}"


def _row(res: dict[str, Any], part: str, partition: str, slow: int, config: str, clients: int | None = None):
    n = clients or res["clients"]
    return next((r for r in res["summary"] if (r["part"], r["partition"], r["slow"], r["clients"], r["config"])
                 == (part, partition, slow, n, config)), None)  # fmt: skip


def markdown(res: dict[str, Any]) -> str:
    budgets = " | ".join(f"accuracy at {b:g} s" for b in res["budgets"])
    head = (
        f"| data | slow | configuration | time to {res['target']:.2f}, smoothed (s) | reached | updates to it | "
        f"{budgets} | final accuracy (points) | idle, fast / slow clients | wasted updates | "
        "slow shard / other shards (points) |"
    )
    lines = [head, "|" + "---|" * (11 + len(res["budgets"]))]
    for row in res["summary"]:
        if row["part"] == "grid":
            continue
        where = f"{row['partition']}" + (f", {row['clients']} clients" if row["clients"] != res["clients"] else "")
        cells = [
            where,
            f"{row['slow']} of {row['clients']}",
            row["config"],
            _pm(row["time_to_target"], 1),
            f"{row['reached']}/{row['ok']}"
            + (f" ({row['runs'] - row['ok']} failed)" if row["runs"] > row["ok"] else ""),
            _pm(row["updates_to_target"], 0),
            *(_pm(b, 1, 100) for b in row["budgets"]),
            _pm(row["final"], 1, 100),
            f"{_pm(row['idle_fast'], 2)} / {_pm(row['idle_slow'], 2)}",
            _pm(row["wasted"], 1),
            f"{_pm(row['slow_shard'], 1, 100)} / {_pm(row['other_shards'], 1, 100)}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    grid_lines = ["| cell | reached (validation) | time to target, smoothed (s) | final validation accuracy |",
                  "|---|---|---|---|"]  # fmt: skip
    for row in res["summary"]:
        if row["part"] == "grid":
            grid_lines.append(f"| {row['config']} | {row['reached']}/{row['ok']} | {_pm(row['time_to_target'], 1)} | "
                              f"{_pm(row['final'], 1, 100)} |")  # fmt: skip
    chosen = res["chosen"]
    return (
        "## Asynchronous training (FedBuff, FedAsync) against sync rounds and over-selection\n\n"
        f"{res['clients']} clients (digits), the same work in every row: {res['rounds']} x {res['clients']} client "
        f"updates of {res['local_epochs']} local epoch(s) (sync: {res['rounds']} rounds; async: versions of K "
        f"updates). Each fit's duration is log-normal (CLIENT_SLOWDOWN_SPREAD={res['spread']:g} around "
        f"CLIENT_SLOWDOWN={res['base_slowdown']:g}, every client a device of its own on this machine's 2 cores); "
        f"the slow client (shard 0) takes {res['slowdown']:g} x as long. Data IID, and pathological (2 label "
        "pieces per shard: every shard, the slow one too, holds classes the others lack). Every version is saved "
        "with the time it was made and evaluated afterwards on the union of the test splits; every row but "
        '"async as shipped" turns evaluation during the run off, so the shipped row pays for its own evaluation '
        f"and the others for none. Time to target: the third of {res['smooth']} consecutive versions whose "
        f"mean accuracy is at least {res['target']}. Seeds {res['seeds']}; mean ± std."
        + (
            f" At {res['big_clients']} clients (seeds {res['big_seeds']}) each shard is smaller, and each fit runs "
            f"{res['local_epochs'] * round(res['big_clients'] / res['clients'])} epochs, so that a fit does the same "
            "work."
            if res["big_clients"]
            else ""
        )
        + "\n\n"
        f"K x eta_g chosen on validation splits (IID, 1 slow client, seeds {res['grid_seeds']}): "
        f"{chosen['fedasync']} and {chosen['fedbuff']} (every cell below).\n\n"
        + "\n".join(grid_lines)
        + "\n\n"
        + "\n".join(lines)
        + "\n"
    )


def plot(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p, s) for p in res["partitions"] for s in res["slow_levels"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    names = list(dict.fromkeys(r["config"] for r in res["runs"] if r["part"] == "main"))
    colours = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (partition, slow) in zip(axes[0], panels):
        for run in res["runs"]:
            if run["part"] != "main" or (run["partition"], run["slow"]) != (partition, slow) or not run["ok"]:
                continue
            t, acc, _ = zip(*run["curve"])
            first = run["seed"] == res["seeds"][0]
            ax.plot(t, acc, color=colours[run["config"]], alpha=0.9 if first else 0.3, lw=1.3 if first else 0.7,
                    label=run["config"] if first else None)  # fmt: skip
        ax.axhline(res["target"], color="grey", ls=":", lw=1)
        ax.set(title=f"{partition}, {slow} of {res['clients']} clients {res['slowdown']:g}x slow",
               xlabel="wall-clock seconds", ylabel="accuracy (all test splits)", ylim=(0.3, 1.0))  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    n = res["clients"]
    shipped = _row(res, "main", "iid", 1, SHIPPED.name)
    for baseline, factor in ((sync(n).name, 2.0), (over_selection(n).name, 1.3)):
        base = _row(res, "main", "iid", 1, baseline)
        if shipped is None or base is None:
            continue
        a, b = shipped["time_to_target"]["mean"], base["time_to_target"]["mean"]
        ratio = b / a if a and b else None
        found.append({
            "target": f"1 of {n} clients {res['slowdown']:g}x slow (IID): async as shipped reaches the smoothed "
                      f"{res['target']} at least {factor:g} x sooner than {baseline}",
            "measured": f"{_f(ratio, 2)} x ({baseline} {_pm(base['time_to_target'], 1)} s, "
                        f"async as shipped {_pm(shipped['time_to_target'], 1)} s)",
            "met": bool(ratio and ratio >= factor),
        })  # fmt: skip
    shipped0, sync0 = _row(res, "main", "iid", 0, SHIPPED.name), _row(res, "main", "iid", 0, sync(n).name)
    if shipped0 and sync0:
        a, b = shipped0["time_to_target"]["mean"], sync0["time_to_target"]["mean"]
        found.append({
            "target": f"no slow client (IID): async as shipped reaches the smoothed {res['target']} within 10 % "
                      "of sync's time",
            "measured": f"async {_f(a, 1)} s, sync {_f(b, 1)} s ({_f(a / b if a and b else None, 2)} x)",
            "met": bool(a and b and a <= 1.1 * b),
        })  # fmt: skip
        fa, fb = shipped0["final"], sync0["final"]
        gap = (fb["mean"] - fa["mean"]) * 100 if fa["mean"] is not None and fb["mean"] is not None else None
        noise = math.hypot(fa["std"] or 0.0, fb["std"] or 0.0) * 100
        found.append({
            "target": "no slow client (IID): async's final accuracy within 1 point of sync's (or within noise)",
            "measured": f"async {_pm(fa, 1, 100)}, sync {_pm(fb, 1, 100)} (gap {_f(gap, 2)} points, "
                        f"noise {noise:.2f})",
            "met": gap is not None and (gap <= 1.0 or gap <= noise),
        })  # fmt: skip
    return found
