"""What the server leaves in RESULTS_DIR: the global model after every round, then the final
model, the history as JSON and CSV, and a plot of loss and accuracy per round."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import BadInput
from shared.modelfile import save_model, write_json

log = logging.getLogger("flowerpot.server")

CHECKPOINT = "checkpoint.npz"  # rewritten after every round: what a restarted server resumes from
PREVIOUS = "previous"  # earlier runs' results, moved aside when a new run starts
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


@dataclass
class Checkpoint:
    """The state of a run after a round: enough to go on from there."""

    run: dict[str, Any]  # the settings that define the run; another value means another run
    round: int
    finished: bool
    parameters: list[np.ndarray]
    strategy_state: dict[str, list[np.ndarray]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


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

    def save_round(self, checkpoint: Checkpoint, meta: dict[str, Any]) -> None:
        """After every round: the global model, the history so far, the checkpoint; after the
        last one also the final model and the plot."""
        save_model(self.folder / GLOBAL_MODEL, checkpoint.parameters, meta)
        self.write_history(checkpoint.history)
        if checkpoint.finished:
            save_model(self.folder / FINAL_MODEL, checkpoint.parameters, meta)
            self.plot(checkpoint.history)
        self.save_checkpoint(checkpoint)

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """One file, replaced atomically: a crash leaves the previous round's checkpoint whole."""
        arrays = {f"param_{i}": a for i, a in enumerate(checkpoint.parameters)}
        for name, values in checkpoint.strategy_state.items():
            arrays.update({f"state_{name}_{i}": a for i, a in enumerate(values)})
        meta = {
            "run": checkpoint.run,
            "round": checkpoint.round,
            "finished": checkpoint.finished,
            "parameters": len(checkpoint.parameters),
            "strategy_state": {name: len(values) for name, values in checkpoint.strategy_state.items()},
            "history": checkpoint.history,
        }
        tmp = self.folder / f".{CHECKPOINT}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, meta=np.array(json.dumps(meta, default=str)), **arrays)
        os.replace(tmp, self.folder / CHECKPOINT)

    def load_checkpoint(self) -> Checkpoint | None:
        path = self.folder / CHECKPOINT
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                parameters = [data[f"param_{i}"] for i in range(meta["parameters"])]
                state = {n: [data[f"state_{n}_{i}"] for i in range(k)] for n, k in meta["strategy_state"].items()}
        except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as exc:
            log.warning("%s cannot be read (%s): not resuming from it", path, exc.__class__.__name__)
            return None
        return Checkpoint(meta["run"], meta["round"], meta["finished"], parameters, state, meta["history"])

    def archive_previous(self) -> Path | None:
        """Move an earlier run's results to previous/<time>/, so that a new run loses nothing."""
        earlier = [p for p in self.folder.iterdir() if p.name != PREVIOUS and not p.name.startswith(".")]
        if not earlier:
            return None
        target = self.folder / PREVIOUS / time.strftime("%Y%m%d-%H%M%S")
        target.mkdir(parents=True, exist_ok=True)
        for path in earlier:
            shutil.move(path, target / path.name)
        log.info("moved the previous run's results to %s", target)
        return target

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
