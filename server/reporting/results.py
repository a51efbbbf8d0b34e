"""What the server leaves in RESULTS_DIR: after every round one line of history.jsonl, the
global model and a checkpoint; at the end (also when a run stops early) the history as JSON and
CSV and a plot of loss and accuracy per round; and the final model.

A round's cost does not grow with the run: it appends one record and writes files of the
model's size, never the whole history."""

from __future__ import annotations

import csv
import errno
import fcntl
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
from flwr.common import Parameters, ndarrays_to_parameters

from server.reporting.record import CSV_COLUMNS, WHEN_PRESENT_COLUMNS, RoundRecord
from shared.errors import BadInput
from shared.modelfile import FINAL_MODEL, PREVIOUS, save_model, to_npy, write_json, write_npz

log = logging.getLogger("flowerpot.server")


CHECKPOINT = "checkpoint.npz"  # rewritten after every round: what a restarted server resumes from
GLOBAL_MODEL = "global_model.npz"  # rewritten after every round
HISTORY_LINES = "history.jsonl"  # one record appended per round: the history a resumed run continues
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
HISTORY_PLOT = "history.png"
# KEEP_ALL_MODELS: every round's (version's) global model, to evaluate a run afterwards at each
# point of its history (the benchmark's accuracy against wall-clock time does).
ALL_MODELS = "models"
# The history is in history.jsonl, not in the checkpoint. Format 1 (no "format" key), which held
# it, was never released: such a file is refused like any unreadable checkpoint.
CHECKPOINT_FORMAT = 2
CHECKPOINT_KEYS = ("run", "round", "finished", "parameters", "strategy_state")
# Flush history.jsonl and the checkpoint to the disk every round (fsync), so that they survive a
# crash of the machine, not only of the process or container (which the atomic replace covers).
# Off: on the development machine it cost 0.7 ms a round when idle and 3 to 6 ms under load, up to
# a third of a bare Flower round with trivial clients (bench --only round-cost); after
# a power cut the server resumes from an older checkpoint (history.jsonl is trimmed to it), or
# refuses a damaged one and starts afresh.
DURABLE = False
FRESH_START = "a new run starts and the earlier results move to previous/"


@dataclass
class Checkpoint:
    """The state of a run after a round: enough to go on from there."""

    run: dict[str, Any]  # the settings that define the run; another value means another run
    round: int
    finished: bool
    parameters: Parameters  # Flower's: .npy bytes per array
    strategy_state: dict[str, list[np.ndarray]] = field(default_factory=dict)
    # Rounds 1..round. Not stored in the checkpoint (history.jsonl holds it); filled in when a
    # run resumes.
    history: list[RoundRecord] | None = None


class Results:
    def __init__(self, folder: Path, keep_all_models: bool = False) -> None:
        self.folder, self.keep_all_models = folder, keep_all_models
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise _unwritable(folder, exc) from None
        self.remove_torn_writes()

    def remove_torn_writes(self) -> None:
        """A file of ours half-written when the server stopped (a full disk, a kill between write
        and rename) is removed: its complete predecessor is still in place."""
        for name in (CHECKPOINT, GLOBAL_MODEL, FINAL_MODEL, HISTORY_LINES, HISTORY_JSON, HISTORY_CSV):
            torn = self.folder / f".{name}.tmp"
            try:
                if torn.is_file():
                    torn.unlink()
                    log.warning("removed %s, left by a write that did not finish (a full disk?)", torn)
            except OSError as exc:
                raise _unwritable(self.folder, exc) from None

    def hold(self) -> None:
        """This server's claim on the folder for as long as it runs: a second server (a second
        `run-local`) on the same RESULTS_DIR says a run is already going, before it binds any
        port. A lock on the folder itself (no file in it); the kernel drops it when the process
        ends, however it ends."""
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BadInput(
                f"a run is already going in RESULTS_DIR={self.folder} (another server has it): wait for that run "
                "to end or stop it, or give this one another RESULTS_DIR, SERVER_LISTEN_ADDRESS and METRICS_PORT"
            ) from None
        self._held: int | None = fd

    def release(self) -> None:
        """Give up `hold`'s claim (idempotent)."""
        fd, self._held = getattr(self, "_held", None), None
        if fd is not None:
            os.close(fd)

    def save_round(self, record: RoundRecord, checkpoint: Checkpoint, meta: dict[str, Any]) -> None:
        """After every round, before the next one starts: the record appended to history.jsonl,
        the global model (after the last round also the final model), then the checkpoint.

        In this order a kill at any moment leaves a whole checkpoint of the last round whose
        files are all written, and at most one record beyond it, which a resumed run drops."""
        try:
            self._append(record)
            save_model(self.folder / GLOBAL_MODEL, checkpoint.parameters.tensors, meta)
            if checkpoint.finished:
                save_model(self.folder / FINAL_MODEL, checkpoint.parameters.tensors, meta)
            if self.keep_all_models:
                (self.folder / ALL_MODELS).mkdir(exist_ok=True)
                save_model(
                    self.folder / ALL_MODELS / f"round_{record.round:06d}.npz", checkpoint.parameters.tensors, meta
                )
            self.save_checkpoint(checkpoint)
        except OSError as exc:
            raise _unwritable(self.folder, exc) from None

    def _append(self, record: RoundRecord) -> None:
        with open(self.folder / HISTORY_LINES, "a") as fh:
            fh.write(record.to_line() + "\n")  # one write: a kill leaves at most a torn last line
            if DURABLE:
                fh.flush()
                os.fdatasync(fh.fileno())

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """One file, replaced atomically: a crash leaves the previous round's checkpoint whole.
        It holds the model and the strategy state, never the history (a constant size)."""
        entries = {f"param_{i}": t for i, t in enumerate(checkpoint.parameters.tensors)}
        for name, values in checkpoint.strategy_state.items():
            entries.update({f"state_{name}_{i}": to_npy(a) for i, a in enumerate(values)})
        meta = {
            "format": CHECKPOINT_FORMAT,
            "run": checkpoint.run,
            "round": checkpoint.round,
            "finished": checkpoint.finished,
            "parameters": len(checkpoint.parameters.tensors),
            "strategy_state": {name: len(values) for name, values in checkpoint.strategy_state.items()},
        }
        entries["meta"] = to_npy(np.array(json.dumps(meta, default=str)))
        write_npz(self.folder / CHECKPOINT, entries, durable=DURABLE)

    def load_checkpoint(self) -> Checkpoint | None:
        """The checkpoint in RESULTS_DIR, or None (with one warning line saying why) when there is
        none, or it cannot be read, or it is of a format this version does not know."""
        path = self.folder / CHECKPOINT
        if not path.is_file():
            return None
        try:
            if not zipfile.is_zipfile(path):  # np.load would take it for a pickle and say so
                raise ValueError("not an .npz archive")
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if not isinstance(meta, dict):
                    raise ValueError("its metadata is not a JSON object")
                version = meta.get("format", 1)
                if version != CHECKPOINT_FORMAT:
                    log.warning(
                        "%s has checkpoint format %r, this Flowerpot reads %d (written by another version): "
                        "not resuming from it; %s", path, version, CHECKPOINT_FORMAT, FRESH_START,
                    )  # fmt: skip
                    return None
                missing = [k for k in CHECKPOINT_KEYS if k not in meta]
                if missing:
                    log.warning(
                        "%s lacks %s in its metadata (damaged, or not written by Flowerpot): not resuming from it; %s",
                        path, ", ".join(missing), FRESH_START,
                    )  # fmt: skip
                    return None
                wrong = meta_problem(meta)
                if wrong is not None:
                    raise ValueError(wrong)
                parameters = [data[f"param_{i}"] for i in range(meta["parameters"])]
                state = {n: [data[f"state_{n}_{i}"] for i in range(k)] for n, k in meta["strategy_state"].items()}
        except (OSError, KeyError, ValueError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
            log.warning("%s cannot be read (%s: %s): not resuming from it; %s",
                        path, exc.__class__.__name__, exc, FRESH_START)  # fmt: skip
            return None
        return Checkpoint(dict(meta["run"]), meta["round"], meta["finished"], ndarrays_to_parameters(parameters), state)

    def resume_history(self, checkpoint: Checkpoint) -> list[RoundRecord] | None:
        """The records of rounds 1..checkpoint.round, and history.jsonl rewritten to hold exactly
        them (a record appended after the checkpoint, or a torn last line, is dropped); None,
        with a warning, when they are not all there."""
        path = self.folder / HISTORY_LINES
        records = self._read_lines(path)
        if records is None:
            return None
        kept = [r for r in records if r.round <= checkpoint.round]
        if [r.round for r in kept] != list(range(1, checkpoint.round + 1)):
            log.warning(
                "%s holds rounds %s, the checkpoint is of round %d: not resuming from it; %s",
                path, _ranges([r.round for r in kept]), checkpoint.round, FRESH_START,
            )  # fmt: skip
            return None
        try:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(r.to_line() + "\n" for r in kept))
            os.replace(tmp, path)
        except OSError as exc:
            raise _unwritable(self.folder, exc) from None
        return kept

    def _read_lines(self, path: Path) -> list[RoundRecord] | None:
        try:
            text = path.read_text()
        except OSError as exc:
            log.warning("%s cannot be read (%s): not resuming; %s", path, exc.strerror or exc, FRESH_START)
            return None
        lines = text.split("\n")
        complete = lines[:-1]  # the text after the last newline is a torn write (or nothing)
        records = []
        for number, line in enumerate(complete, start=1):
            try:
                record = RoundRecord.from_line(line)
                if not _whole(record.round):
                    raise ValueError(f"its round is {record.round!r}, not a whole number")
                records.append(record)
            except (ValueError, TypeError) as exc:  # json's errors are ValueErrors too
                log.warning("%s line %d is not a round record (%s): not resuming; %s", path, number, exc, FRESH_START)
                return None
        return records

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

    def write_history(self, history: list[RoundRecord]) -> None:
        """history.json, history.csv and history.png: at the end of a run, and when it stops early."""
        if not history:
            return
        rows = [r.to_json() for r in history]
        try:
            write_json(self.folder / HISTORY_JSON, rows)
            tmp = self.folder / f".{HISTORY_CSV}.tmp"
            with open(tmp, "w", newline="") as fh:
                # Async runs add their staleness columns; a sync history.csv is as it always was.
                extra = [k for k in WHEN_PRESENT_COLUMNS if any(k in row for row in rows)]
                writer = csv.DictWriter(fh, fieldnames=[*CSV_COLUMNS, *extra], extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, self.folder / HISTORY_CSV)
            self.plot(history)
        except OSError as exc:
            raise _unwritable(self.folder, exc) from None

    def plot(self, history: list[RoundRecord]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [h.round for h in history]
        # Async records carry the evaluation of an earlier version (eval_version): plotted there.
        evaluated = [h.round if h.eval_version is None else h.eval_version for h in history]
        at = {"train_loss": rounds, "eval_loss": evaluated, "train_accuracy": rounds, "eval_accuracy": evaluated}
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        for key, label in (("train_loss", "train"), ("eval_loss", "evaluation")):
            ax_loss.plot(at[key], _series(history, key), marker="o", label=label)
        ax_loss.set(title="Loss per round", xlabel="round", ylabel="loss")
        ax_loss.legend()
        for key, label in (("train_accuracy", "train"), ("eval_accuracy", "evaluation")):
            ax_acc.plot(at[key], _series(history, key), marker="o", label=label)
        ax_acc.set(title="Accuracy per round", xlabel="round", ylabel="accuracy", ylim=(0, 1.02))
        ax_acc.legend()
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        fig.tight_layout()
        fig.savefig(self.folder / HISTORY_PLOT, dpi=100)
        plt.close(fig)


def meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the types of a checkpoint's metadata, or None. Checked before any use:
    a damaged value must end in a new run, never in a traceback, and "false" (a string) must not
    read as finished."""
    if not isinstance(meta["run"], dict):
        return f"its run is {meta['run']!r}, not a JSON object of settings"
    if not _whole(meta["round"]) or meta["round"] < 1:
        return f"its round is {meta['round']!r}, not a whole number from 1"
    if not isinstance(meta["finished"], bool):
        return f"its finished is {meta['finished']!r}, not true or false"
    if not _whole(meta["parameters"]) or meta["parameters"] < 1:
        return f"its parameters is {meta['parameters']!r}, not a count of arrays from 1"
    state = meta["strategy_state"]
    if not isinstance(state, dict) or not all(_whole(k) and k >= 0 for k in state.values()):
        return f"its strategy_state is {state!r}, not a JSON object of array counts"
    return None


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unwritable(folder: Path, exc: OSError) -> BadInput:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = "free some disk space" if exc.errno == errno.ENOSPC else "make it writable or choose another RESULTS_DIR"
    return BadInput(f"RESULTS_DIR={folder} cannot be written ({reason}): {hint}")


def _series(history: list[RoundRecord], key: str) -> list[float]:
    values = [getattr(h, key) for h in history]
    return [np.nan if v is None else v for v in values]


def _ranges(rounds: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"; "none" when empty."""
    spans: list[list[int]] = []
    for r in rounds:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans) or "none"
