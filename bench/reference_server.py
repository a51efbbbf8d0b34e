"""The benchmark's reference: Flower's own `start_server` with a plain FedAvg, nothing of ours.

The strategy only notes when each round starts and what the clients report about their own
train and evaluate times, so that overhead is measured the same way as for Flowerpot's server.
Settings come from the same environment variables; the record goes to RESULTS_DIR/reference.json.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.server import ServerConfig, start_server
from flwr.server.strategy import FedAvg


class TimedFedAvg(FedAvg):
    def __init__(self, num_rounds: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.records: dict[int, dict] = {}
        self.num_rounds = num_rounds

    def configure_fit(self, server_round, parameters, client_manager):
        self.records[server_round] = {"round": server_round, "started_at": time.time(), "clients": []}
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        self._note(server_round, "fit", results)
        return super().aggregate_fit(server_round, results, failures)

    def aggregate_evaluate(self, server_round, results, failures):
        self._note(server_round, "evaluate", results)
        return super().aggregate_evaluate(server_round, results, failures)

    def _note(self, server_round: int, phase: str, results: list) -> None:
        self.records[server_round]["clients"] += [
            {"client": str(res.metrics.get("shard", proxy.cid)), "phase": phase, "num_examples": res.num_examples,
             "metrics": {k: v for k, v in res.metrics.items() if isinstance(v, int | float)}}
            for proxy, res in results
        ]  # fmt: skip


def main() -> None:
    env = os.environ
    rounds, clients = int(env.get("NUM_ROUNDS", "5")), int(env.get("MIN_AVAILABLE_CLIENTS", "3"))
    results = Path(env.get("RESULTS_DIR", "results"))
    results.mkdir(parents=True, exist_ok=True)
    config = {
        "local_epochs": int(env.get("LOCAL_EPOCHS", "3")),
        "batch_size": int(env.get("BATCH_SIZE", "32")),
        "learning_rate": float(env.get("LEARNING_RATE", "0.05")),
    }
    # Every client each round, unless FRACTION_FIT / FRACTION_EVALUATE sample (the cross-device
    # rows), then with Flowerpot's MIN_FIT_CLIENTS / MIN_EVALUATE_CLIENTS as the floor.
    fit, evaluate = float(env.get("FRACTION_FIT", "1")), float(env.get("FRACTION_EVALUATE", "1"))
    strategy = TimedFedAvg(
        rounds,
        fraction_fit=fit,
        fraction_evaluate=evaluate,
        min_fit_clients=clients if fit == 1 else int(env.get("MIN_FIT_CLIENTS", "2")),
        min_evaluate_clients=clients if evaluate == 1 else int(env.get("MIN_EVALUATE_CLIENTS", "2")),
        min_available_clients=clients,
        on_fit_config_fn=lambda r: {"server_round": r, "num_rounds": rounds, **config},
        on_evaluate_config_fn=lambda r: {"server_round": r, "num_rounds": rounds},
    )
    logging.getLogger("flwr").setLevel(logging.WARNING)
    start_server(server_address=env["SERVER_LISTEN_ADDRESS"], config=ServerConfig(num_rounds=rounds), strategy=strategy)
    (results / "reference.json").write_text(
        json.dumps([strategy.records[r] for r in sorted(strategy.records)], indent=1)
    )


if __name__ == "__main__":
    main()
