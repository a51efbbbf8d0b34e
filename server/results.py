"""What the server leaves in RESULTS_DIR: the global model after every round, then the final
model, the history as JSON and CSV, and a plot of loss and accuracy per round."""

from __future__ import annotations

import csv
import errno
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import BadInput
from shared.modelfile import save_model, write_json

log = logging.getLogger("flowerpot.server")

GLOBAL_MODEL = "global_model.npz"  # rewritten after every round
FINAL_MODEL = "final_model.npz"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
HISTORY_PLOT = "history.png"
CSV_COLUMNS = (
    "round",
    "clients_trained",
    "clients_failed",
    "updates_refused",
    "clients_evaluated",
    "train_loss",
    "train_accuracy",
    "eval_loss",
    "eval_accuracy",
    "seconds",
)


class Results:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = (
                "free some disk space"
                if exc.errno == errno.ENOSPC
                else "make it writable for this user or choose another RESULTS_DIR"
            )
            raise BadInput(f"RESULTS_DIR={folder} cannot be written ({reason}): {hint}") from None

    def save_round(self, arrays: list[np.ndarray], meta: dict[str, Any]) -> None:
        save_model(self.folder / GLOBAL_MODEL, arrays, meta)

    def finish(self, arrays: list[np.ndarray], meta: dict[str, Any], history: list[dict[str, Any]]) -> None:
        save_model(self.folder / FINAL_MODEL, arrays, meta)
        self.write_history(history)
        self.plot(history)

    def write_history(self, history: list[dict[str, Any]]) -> None:
        write_json(self.folder / HISTORY_JSON, history)
        tmp = self.folder / f".{HISTORY_CSV}.tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)
        os.replace(tmp, self.folder / HISTORY_CSV)

    def plot(self, history: list[dict[str, Any]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [h["round"] for h in history]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        for key, label in (("train_loss", "train"), ("eval_loss", "evaluation")):
            ax_loss.plot(rounds, _series(history, key), marker="o", label=label)
        ax_loss.set(title="Loss per round", xlabel="round", ylabel="loss")
        ax_loss.legend()
        for key, label in (("train_accuracy", "train"), ("eval_accuracy", "evaluation")):
            ax_acc.plot(rounds, _series(history, key), marker="o", label=label)
        ax_acc.set(title="Accuracy per round", xlabel="round", ylabel="accuracy", ylim=(0, 1.02))
        ax_acc.legend()
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        fig.tight_layout()
        fig.savefig(self.folder / HISTORY_PLOT, dpi=100)
        plt.close(fig)


def _series(history: list[dict[str, Any]], key: str) -> list[float]:
    return [np.nan if h.get(key) is None else h[key] for h in history]
