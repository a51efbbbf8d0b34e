"""Accuracy against its limits, at equal total local epochs (NUM_ROUNDS x LOCAL_EPOCHS):
centralized training on the union of the shards (the upper bound), federated training under
several partitions and strategies, and each client alone on its own shard.

Strategies are compared each at its own tuned default (README, "Server-optimizer defaults") over
at least five seeds; the report marks differences within noise. The federations' clients are
forked warm (bench.warm.WarmPopen): they train and are measured exactly as plain ones, only their
2.3 s of imports each are done once; what is measured here is accuracy, not start-up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from bench.federation import prepare, run_federation

log = logging.getLogger("flowerpot.bench")

PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": {"PARTITION": "iid"},
    "dirichlet-0.5": {"PARTITION": "dirichlet", "DIRICHLET_ALPHA": 0.5},
    "dirichlet-0.1": {"PARTITION": "dirichlet", "DIRICHLET_ALPHA": 0.1},
    "label-shards-2": {"PARTITION": "pathological", "LABELS_PER_CLIENT": 2},
}


def shards_of(data: Path) -> list:
    from client.data.shards import load_shard, shard_dirs

    return [load_shard(d) for d in shard_dirs(data)]


def centralized(data: Path, rounds: int, epochs: int, seed: int, batch_size: int, lr: float) -> list[float]:
    """One model on the union of all training splits; accuracy on the union of all test splits
    after every `epochs` epochs (one federated round's worth)."""
    import torch

    from client.tasks import evaluate_arrays, load_task, train_arrays

    task = load_task()  # the built-in task: the benchmark measures Flowerpot's own figures

    torch.set_num_threads(1)
    shards = shards_of(data)
    spec = shards[0].spec
    x_train, y_train = np.concatenate([s.x_train for s in shards]), np.concatenate([s.y_train for s in shards])
    x_test, y_test = np.concatenate([s.x_test for s in shards]), np.concatenate([s.y_test for s in shards])
    model = task.new_model(spec, seed)
    curve = []
    for r in range(1, rounds + 1):
        train_arrays(
            task, model, x_train, y_train, spec, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed * 100_003 + r
        )
        curve.append(evaluate_arrays(task, model, x_test, y_test, spec)["accuracy"])
    return curve


def local_only(data: Path, rounds: int, epochs: int, seed: int, batch_size: int, lr: float) -> dict[str, float]:
    """Each client alone for all the epochs: accuracy on its own test split and on everyone's."""
    import torch

    from client.tasks import evaluate_arrays, load_task, train_arrays

    task = load_task()  # the built-in task: the benchmark measures Flowerpot's own figures

    torch.set_num_threads(1)
    shards = shards_of(data)
    spec = shards[0].spec
    x_all, y_all = np.concatenate([s.x_test for s in shards]), np.concatenate([s.y_test for s in shards])
    own, everyone = [], []
    for shard in shards:
        model = task.new_model(spec, seed)
        for r in range(1, rounds + 1):
            train_arrays(
                task,
                model,
                shard.x_train,
                shard.y_train,
                spec,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                seed=seed * 100_003 + r,
            )
        own.append(evaluate_arrays(task, model, shard.x_test, shard.y_test, spec)["accuracy"])
        everyone.append(evaluate_arrays(task, model, x_all, y_all, spec)["accuracy"])
    return {"own_test_mean": float(np.mean(own)), "all_tests_mean": float(np.mean(everyone))}


def measure(
    workdir: Path,
    partitions: list[str],
    strategies: list[str],
    seeds: list[int],
    rounds: int,
    epochs: int,
    clients: int,
) -> dict[str, Any]:
    from shared.settings import Settings

    defaults = Settings()
    batch, lr = defaults.batch_size, defaults.learning_rate
    out: dict[str, Any] = {
        "rounds": rounds,
        "local_epochs": epochs,
        "clients": clients,
        "seeds": seeds,
        "partitions": {},
    }
    runs, done = len(partitions) * len(seeds) * len(strategies), 0
    for partition in partitions:
        entry: dict[str, Any] = {"federated": {s: [] for s in strategies}, "centralized": [], "local_only": []}
        for seed in seeds:
            data = workdir / f"data-{partition}-{seed}"
            settings = {**PARTITIONS[partition], "DATA_DIR": data, "NUM_SHARDS": clients, "SEED": seed}
            prepare(data, **settings)
            entry["centralized"].append(centralized(data, rounds, epochs, seed, batch, lr))
            entry["local_only"].append(local_only(data, rounds, epochs, seed, batch, lr))
            for strategy in strategies:
                run = run_federation(
                    workdir / f"{partition}-{strategy}-{seed}",
                    clients,
                    {**settings, "STRATEGY": strategy, "NUM_ROUNDS": rounds, "LOCAL_EPOCHS": epochs,
                     "MIN_FIT_CLIENTS": clients, "MIN_EVALUATE_CLIENTS": clients},
                    warm=True,
                )  # fmt: skip
                entry["federated"][strategy].append([r["eval_accuracy"] for r in run.history] if run.ok else None)
                done += 1
                log.info("bench: accuracy run %d of %d (%s, %s, seed %d): %s", done, runs, partition, strategy, seed,
                         "ok" if run.ok else "failed")  # fmt: skip
        entry["summary"] = summarize(entry)
        out["partitions"][partition] = entry
    return out


def summarize(entry: dict[str, Any]) -> dict[str, Any]:
    """Final accuracies, mean over seeds."""
    final = lambda curves: float(np.mean([c[-1] for c in curves if c])) if any(curves) else float("nan")  # noqa: E731
    return {
        "centralized": final(entry["centralized"]),
        "local_only_own_test": float(np.mean([x["own_test_mean"] for x in entry["local_only"]])),
        "local_only_all_tests": float(np.mean([x["all_tests_mean"] for x in entry["local_only"]])),
        **{f"federated_{s}": final(curves) for s, curves in entry["federated"].items()},
    }
