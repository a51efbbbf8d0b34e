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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import Parameters, ndarrays_to_parameters

from shared.errors import BadInput
from shared.modelfile import FINAL_MODEL, save_model, to_npy, write_json, write_npz

log = logging.getLogger("flowerpot.server")

CHECKPOINT = "checkpoint.npz"  # rewritten after every round: what a restarted server resumes from
PREVIOUS = "previous"  # earlier runs' results, moved aside when a new run starts
GLOBAL_MODEL = "global_model.npz"  # rewritten after every round
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
    "bytes_sent",
    "bytes_received",
)


@dataclass
class Checkpoint:
    """The state of a run after a round: enough to go on from there."""

    run: dict[str, Any]  # the settings that define the run; another value means another run
    round: int
    finished: bool
    parameters: Parameters  # Flower's: .npy bytes per array
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
            raise _unwritable(folder, exc) from None
        # Each round's files are written by one background thread, in order, while the next
        # round runs: they cost the round nothing. `flush` waits for them and raises their errors.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="results")
        self._writes: list[Future[None]] = []

    def save_round(self, checkpoint: Checkpoint, meta: dict[str, Any]) -> None:
        """After every round: the global model and the checkpoint; after the last one also the
        final model and the history as JSON, CSV and plot (that one is waited for)."""
        self._raise_failures()
        snapshot = replace(checkpoint, history=list(checkpoint.history))
        self._writes.append(self._writer.submit(self._write_round, snapshot, meta))
        if checkpoint.finished:
            self.flush()

    def flush(self) -> None:
        """Wait for the writes in flight; BadInput if one failed."""
        for write in self._writes:
            write.result()
        self._writes.clear()

    def _raise_failures(self) -> None:
        for write in [w for w in self._writes if w.done()]:
            write.result()
            self._writes.remove(write)

    def _write_round(self, checkpoint: Checkpoint, meta: dict[str, Any]) -> None:
        try:
            self._write_files(checkpoint, meta)
        except OSError as exc:
            raise _unwritable(self.folder, exc) from None

    def _write_files(self, checkpoint: Checkpoint, meta: dict[str, Any]) -> None:
        tensors = checkpoint.parameters.tensors
        save_model(self.folder / GLOBAL_MODEL, tensors, meta)
        self.save_checkpoint(checkpoint)  # holds the history so far, too
        if checkpoint.finished:
            save_model(self.folder / FINAL_MODEL, tensors, meta)
            self.write_history(checkpoint.history)

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """One file, replaced atomically: a crash leaves the previous round's checkpoint whole."""
        entries = {f"param_{i}": t for i, t in enumerate(checkpoint.parameters.tensors)}
        for name, values in checkpoint.strategy_state.items():
            entries.update({f"state_{name}_{i}": to_npy(a) for i, a in enumerate(values)})
        meta = {
            "run": checkpoint.run,
            "round": checkpoint.round,
            "finished": checkpoint.finished,
            "parameters": len(checkpoint.parameters.tensors),
            "strategy_state": {name: len(values) for name, values in checkpoint.strategy_state.items()},
            "history": checkpoint.history,
        }
        entries["meta"] = to_npy(np.array(json.dumps(meta, default=str)))
        write_npz(self.folder / CHECKPOINT, entries)

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
        return Checkpoint(
            meta["run"], meta["round"], meta["finished"], ndarrays_to_parameters(parameters), state, meta["history"]
        )

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
        """history.json, history.csv and history.png."""
        if not history:
            return
        write_json(self.folder / HISTORY_JSON, history)
        tmp = self.folder / f".{HISTORY_CSV}.tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)
        os.replace(tmp, self.folder / HISTORY_CSV)
        self.plot(history)

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


def _unwritable(folder: Path, exc: OSError) -> BadInput:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = "free some disk space" if exc.errno == errno.ENOSPC else "make it writable or choose another RESULTS_DIR"
    return BadInput(f"RESULTS_DIR={folder} cannot be written ({reason}): {hint}")


def _series(history: list[dict[str, Any]], key: str) -> list[float]:
    return [np.nan if h.get(key) is None else h[key] for h in history]
