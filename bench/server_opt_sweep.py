"""The sweep that chose the server-optimizer defaults (shared/strategy_table.py, the `tuned` values).

FedAdam, FedYogi and FedAdagrad at a few server learning rates (eta) with tau=1e-3 (Reddi et al.
2021, "Adaptive Federated Optimization", tune eta around 1e-2..1e-1 with tau 1e-3), against
Flower's legacy defaults (eta=0.1, tau=1e-9) and FedAvg, on digits, Dirichlet 0.5, 3 clients,
5 rounds, a few seeds. Prints one line per configuration: final accuracy mean and std over seeds.
The accuracy is on validation splits (VALIDATION_FRACTION of each shard's training examples,
EVALUATE_SPLIT=validation), never on the test splits that the benchmark reports.

    python -m bench.server_opt_sweep --out /tmp/sweep --seeds 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.federation import prepare, run_federation

ETAS = (0.01, 0.03, 0.1)
CONFIGS: list[tuple[str, dict[str, str]]] = [
    ("fedavg", {}),
    *[
        (s, {"SERVER_LEARNING_RATE": str(eta), "TAU": "0.001"})
        for s in ("fedadam", "fedyogi", "fedadagrad")
        for eta in ETAS
    ],
    ("fedadam", {"SERVER_LEARNING_RATE": "0.1", "TAU": "1e-9"}),  # Flower's legacy defaults
    ("fedadagrad", {"SERVER_LEARNING_RATE": "0.1", "TAU": "1e-9"}),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    base = {"PARTITION": "dirichlet", "DIRICHLET_ALPHA": "0.5", "NUM_SHARDS": "3", "NUM_ROUNDS": str(args.rounds),
            "MIN_FIT_CLIENTS": "3", "MIN_EVALUATE_CLIENTS": "3", "VALIDATION_FRACTION": "0.15",
            "EVALUATE_SPLIT": "validation"}  # fmt: skip
    table = []
    for strategy, knobs in CONFIGS:
        finals = []
        for seed in args.seeds:
            data = args.out / f"data-{seed}"
            if not data.is_dir():
                prepare(data, **base, SEED=seed)
            name = f"{strategy}-{'-'.join(knobs.values()) or 'default'}-{seed}"
            run = run_federation(
                args.out / name, 3, {**base, "SEED": seed, "DATA_DIR": data, "STRATEGY": strategy, **knobs}
            )
            finals.append(run.history[-1]["eval_accuracy"] if run.ok else float("nan"))
        row = {"strategy": strategy, **knobs, "finals": finals, "mean": statistics.mean(finals),
               "std": statistics.stdev(finals) if len(finals) > 1 else 0.0}  # fmt: skip
        table.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "sweep.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
