"""`Results` and resume, directly: what each round leaves, the final files, checkpoints that
round-trip, checkpoints of another format, and when a restarted server resumes."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from server.reporting.record import CSV_COLUMNS, ClientEntry, RoundRecord
from server.reporting.results import CHECKPOINT, HISTORY_LINES, Checkpoint, Results
from server.training.rounds import Federation
from server.transport.admission import BoundedClientManager
from server.transport.wiring import Traffic
from shared.modelfile import load_model, to_npy, write_json, write_npz
from shared.settings import Settings

ARRAYS = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)]
STATE = {"m_t": [np.full((2, 3), 0.5), np.zeros(4)], "v_t": [np.full((2, 3), 0.25), np.ones(4)]}
RUN = {"num_rounds": 5, "strategy": "fedadam", "learning_rate": 0.05}

# A round as the previous version built it in server/training/rounds.py (an untyped dict) and wrote it
# into history.json and into the checkpoint's metadata.
OLD_RECORD = {
    "round": 1, "clients_trained": 3, "clients_failed": 0, "updates_refused": 0, "clients_evaluated": 3,
    "eval_failures": 0, "train_loss": 0.9, "train_accuracy": 0.7, "eval_loss": 0.5, "eval_accuracy": 0.85,
    "seconds": 0.3, "fit_seconds": 0.2, "started_at": 1700000000.0, "bytes_sent": 1000, "bytes_received": 900,
    "model_bytes": 212, "fit_metrics": {"train_loss": 0.9}, "eval_metrics": {"accuracy": 0.85},
    "clients": [
        {"client": "site-a", "phase": "fit", "num_examples": 100, "metrics": {"train_loss": 0.9, "shard": 0}},
        {"client": "site-a", "phase": "evaluate", "num_examples": 25, "metrics": {"loss": 0.5, "accuracy": 0.85}},
    ],
}  # fmt: skip


def record(n: int, accuracy: float = 0.5) -> RoundRecord:
    return RoundRecord.from_json({**OLD_RECORD, "round": n, "eval_accuracy": accuracy})


def checkpoint(n: int, finished: bool = False, run: dict | None = None) -> Checkpoint:
    arrays = [a + n for a in ARRAYS]
    return Checkpoint(run or RUN, n, finished, ndarrays_to_parameters(arrays), STATE)


def play(results: Results, rounds: int, finished_at: int | None = None, run: dict | None = None) -> None:
    for n in range(1, rounds + 1):
        results.save_round(record(n), checkpoint(n, n == finished_at, run), {"round": n})


def lines(folder: Path) -> list[str]:
    return (folder / HISTORY_LINES).read_text().splitlines()


def test_each_round_appends_one_record_and_a_checkpoint_that_does_not_grow(tmp_path: Path) -> None:
    results = Results(tmp_path)
    sizes = []
    for n in range(1, 6):
        results.save_round(record(n), checkpoint(n), {"round": n})
        sizes.append((tmp_path / CHECKPOINT).stat().st_size)
        assert len(lines(tmp_path)) == n
        assert RoundRecord.from_line(lines(tmp_path)[-1]) == record(n)
        arrays, meta = load_model(tmp_path / "global_model.npz")
        assert meta["round"] == n and np.array_equal(arrays[0], ARRAYS[0] + n)
    assert len(set(sizes)) == 1  # the history is not in the checkpoint
    meta = json.loads(np.load(tmp_path / CHECKPOINT)["meta"].item())
    assert meta["format"] == 2 and "history" not in meta and meta["round"] == 5
    assert not (tmp_path / "history.json").exists() and not (tmp_path / "final_model.npz").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_the_last_round_writes_the_final_model_and_the_history_files(tmp_path: Path) -> None:
    results = Results(tmp_path)
    play(results, 3, finished_at=3)
    assert load_model(tmp_path / "final_model.npz")[1]["round"] == 3
    history = [record(n) for n in (1, 2, 3)]
    results.write_history(history)
    written = json.loads((tmp_path / "history.json").read_text())
    assert written == [r.to_json() for r in history]
    assert set(written[0]) == set(OLD_RECORD) and set(written[0]["clients"][0]) == set(OLD_RECORD["clients"][0])
    with open(tmp_path / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS and [r["round"] for r in rows] == ["1", "2", "3"]
    assert (tmp_path / "history.png").stat().st_size > 1000


def test_a_checkpoint_round_trips_with_the_strategy_state(tmp_path: Path) -> None:
    results = Results(tmp_path)
    results.save_checkpoint(checkpoint(4))
    (tmp_path / f".{CHECKPOINT}.tmp").write_bytes(b"half a zip")  # a kill in the middle of the next write
    loaded = results.load_checkpoint()
    assert loaded is not None and (loaded.run, loaded.round, loaded.finished) == (RUN, 4, False)
    assert all(np.array_equal(a, b + 4) for a, b in zip(parameters_to_ndarrays(loaded.parameters), ARRAYS))
    assert loaded.parameters.tensors == checkpoint(4).parameters.tensors  # byte for byte
    assert set(loaded.strategy_state) == set(STATE)
    for name, arrays in STATE.items():
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(loaded.strategy_state[name], arrays))
    assert loaded.history is None


def write_checkpoint(folder: Path, history: list[dict], meta_overrides: dict | None = None) -> None:
    """checkpoint.npz as Results.save_checkpoint writes it, with `meta_overrides` in its metadata
    (None: the key left out), and history.jsonl with `history`."""
    entries = {f"param_{i}": to_npy(a) for i, a in enumerate(ARRAYS)}
    for name, values in STATE.items():
        entries.update({f"state_{name}_{i}": to_npy(a) for i, a in enumerate(values)})
    meta = {
        "format": 2,
        "run": RUN,
        "round": len(history),
        "finished": False,
        "parameters": len(ARRAYS),
        "strategy_state": {name: len(values) for name, values in STATE.items()},
        **(meta_overrides or {}),
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    entries["meta"] = to_npy(np.array(json.dumps(meta, default=str)))
    write_npz(folder / CHECKPOINT, entries)
    (folder / HISTORY_LINES).write_text("".join(json.dumps(r) + "\n" for r in history))


def test_a_checkpoint_of_the_unreleased_format_1_starts_a_new_run(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Format 1 (no "format" key, the history in the metadata) was never released: one warning
    naming the file, the old results moved aside, a new run."""
    old = [{**OLD_RECORD, "round": n} for n in (1, 2)]
    folder = settings.results_dir
    folder.mkdir()
    write_checkpoint(folder, [], {"format": None, "round": 2, "history": old})
    write_json(folder / "history.json", old)
    fed = federation(settings)
    with caplog.at_level(logging.WARNING, logger="flowerpot.server"):
        assert fed.resumable() is None
    assert len(caplog.records) == 1, caplog.text
    assert f"{folder / CHECKPOINT} has checkpoint format 1, this Flowerpot reads 2" in caplog.text
    assert "a new run starts and the earlier results move to previous/" in caplog.text
    fed.results.archive_previous()  # as run() does once the new run's clients are there
    (archived,) = (folder / "previous").iterdir()
    assert (archived / CHECKPOINT).is_file() and (archived / "history.json").is_file()
    assert not (folder / CHECKPOINT).exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ({"history": [{"round": 1}, {**OLD_RECORD, "round": 2}]}, "a round record lacks clients_trained"),
        ({"round": 3}, "holds rounds 1-2, the checkpoint is of round 3"),
        ({"format": 7}, "has checkpoint format 7, this Flowerpot reads 2"),
        ({"format": None}, "has checkpoint format 1, this Flowerpot reads 2"),
    ],
)
def test_old_or_foreign_checkpoints_are_refused_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: dict, message: str
) -> None:
    history = damage.pop("history", [{**OLD_RECORD, "round": n} for n in (1, 2)])
    write_checkpoint(tmp_path, history, {"round": len(history), **damage})
    results = Results(tmp_path)
    with caplog.at_level(logging.WARNING, logger="flowerpot.server"):
        loaded = results.load_checkpoint()
        if loaded is not None:
            assert results.resume_history(loaded) is None
    assert len(caplog.records) == 1 and message in caplog.text, caplog.text
    assert "a new run starts and the earlier results move to previous/" in caplog.text
    assert str(tmp_path) in caplog.text


@pytest.mark.parametrize("missing", ["run", "round", "finished", "parameters", "strategy_state"])
def test_a_checkpoint_without_a_metadata_key_is_refused_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, missing: str
) -> None:
    results = Results(tmp_path)
    results.save_checkpoint(checkpoint(2))
    with np.load(tmp_path / CHECKPOINT) as data:
        entries = {name: to_npy(data[name]) for name in data.files}
    meta = json.loads(np.load(tmp_path / CHECKPOINT)["meta"].item())
    del meta[missing]
    entries["meta"] = to_npy(np.array(json.dumps(meta)))
    write_npz(tmp_path / CHECKPOINT, entries)
    with caplog.at_level(logging.WARNING, logger="flowerpot.server"):
        assert results.load_checkpoint() is None
    assert f"{tmp_path / CHECKPOINT} lacks {missing} in its metadata" in caplog.text


def test_a_file_that_is_no_checkpoint_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / CHECKPOINT).write_text("not a zip")
    with caplog.at_level(logging.WARNING, logger="flowerpot.server"):
        assert Results(tmp_path).load_checkpoint() is None
    assert "cannot be read (ValueError: not an .npz archive)" in caplog.text and "not resuming from it" in caplog.text


def test_resume_drops_a_record_beyond_the_checkpoint_and_a_torn_line(tmp_path: Path) -> None:
    results = Results(tmp_path)
    play(results, 3)
    with open(tmp_path / HISTORY_LINES, "a") as fh:  # killed after appending round 4, before its checkpoint
        fh.write(record(4).to_line() + "\n" + record(5).to_line()[:40])  # ... and in the middle of a line
    loaded = results.load_checkpoint()
    assert loaded is not None and loaded.round == 3
    kept = results.resume_history(loaded)
    assert kept == [record(1), record(2), record(3)]
    assert [RoundRecord.from_line(line).round for line in lines(tmp_path)] == [1, 2, 3]
    results.save_round(record(4), checkpoint(4), {"round": 4})  # the resumed run appends after them
    assert [RoundRecord.from_line(line).round for line in lines(tmp_path)] == [1, 2, 3, 4]


def test_a_history_that_lacks_rounds_is_not_resumed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    results = Results(tmp_path)
    play(results, 3)
    (tmp_path / HISTORY_LINES).write_text("".join(record(n).to_line() + "\n" for n in (1, 3)))
    with caplog.at_level(logging.WARNING, logger="flowerpot.server"):
        assert results.resume_history(results.load_checkpoint()) is None
    assert "holds rounds 1, 3, the checkpoint is of round 3" in caplog.text


def test_archive_previous_moves_everything_but_earlier_archives(tmp_path: Path) -> None:
    results = Results(tmp_path)
    assert results.archive_previous() is None
    play(results, 2)
    (tmp_path / "client_shard_000").mkdir()
    (tmp_path / "client_shard_000" / "final_model.npz").write_bytes(b"x")
    target = results.archive_previous()
    assert target is not None and target.parent == tmp_path / "previous"
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [CHECKPOINT, HISTORY_LINES, "global_model.npz", "global_model.json", "client_shard_000"]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["previous"]


def test_round_records_refuse_what_they_cannot_read() -> None:
    with pytest.raises(ValueError, match="lacks eval_failures"):
        RoundRecord.from_json({k: v for k, v in OLD_RECORD.items() if k != "eval_failures"})
    with pytest.raises(ValueError, match="phase 'train'"):
        RoundRecord.from_json({**OLD_RECORD, "clients": [{**OLD_RECORD["clients"][0], "phase": "train"}]})
    entry = record(1).clients[0]
    assert entry == ClientEntry("site-a", "fit", 100, {"train_loss": 0.9, "shard": 0})


# --- resume: Federation.resumable -------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    return Settings(num_rounds=5, strategy="fedadam", results_dir=tmp_path / "results")


def federation(settings: Settings) -> Federation:
    return Federation(settings, BoundedClientManager(1.0), Results(settings.results_dir), Traffic())


def test_an_unfinished_run_with_the_same_settings_resumes(settings: Settings) -> None:
    first = federation(settings)
    play(first.results, 2, run=first.fingerprint)
    resumed = federation(settings).resumable()
    assert resumed is not None and resumed.round == 2 and resumed.history == [record(1), record(2)]
    assert all(np.array_equal(a, b) for a, b in zip(resumed.strategy_state["v_t"], STATE["v_t"]))
    assert not (settings.results_dir / "previous").exists()  # nothing moved aside


def test_a_finished_run_is_not_resumed_and_its_results_move_aside(settings: Settings) -> None:
    first = federation(settings)
    play(first.results, 5, finished_at=5, run=first.fingerprint)
    second = federation(settings)
    assert second.resumable() is None
    assert not (settings.results_dir / "previous").exists()  # moved once the new run's clients are there:
    second.results.archive_previous()  # as run() does then
    (archived,) = (settings.results_dir / "previous").iterdir()
    assert (archived / "final_model.npz").is_file() and (archived / HISTORY_LINES).is_file()
    assert not (settings.results_dir / CHECKPOINT).exists()


def test_other_settings_start_a_new_run_and_the_changes_are_named(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    first = federation(settings)
    play(first.results, 2, run=first.fingerprint)
    other = settings.model_copy(update={"learning_rate": 0.1, "local_epochs": 7})
    second = federation(other)
    with caplog.at_level(logging.WARNING, logger="flowerpot.server"):
        assert second.resumable() is None
    assert "not resuming the unfinished run" in caplog.text and "settings changed (LEARNING_RATE, LOCAL_EPOCHS)" in (
        caplog.text
    )
    second.results.archive_previous()  # as run() does once the new run's clients are there
    (archived,) = (settings.results_dir / "previous").iterdir()
    assert (archived / CHECKPOINT).is_file()


def test_durable_writes_give_the_same_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DURABLE (fsync every round, off by default for its cost) changes when, not what, is written."""
    import server.reporting.results

    monkeypatch.setattr(server.reporting.results, "DURABLE", True)
    results = Results(tmp_path)
    play(results, 2)
    loaded = results.load_checkpoint()
    assert loaded is not None and loaded.round == 2 and results.resume_history(loaded) == [record(1), record(2)]


def test_a_failed_round_is_recorded_and_old_records_read_as_applied() -> None:
    """`failed` came after the first histories: those still read, as rounds that were applied."""
    old = RoundRecord.from_json(OLD_RECORD)
    assert old.failed is None
    failed = RoundRecord.from_json({**OLD_RECORD, "failed": "only 1 of 3 sampled clients sent a sound update"})
    assert RoundRecord.from_line(failed.to_line()) == failed
    assert "failed" in CSV_COLUMNS and "failed" not in old.to_json()  # applied rounds: written as before


# The run-defining settings a checkpoint of the previous version recorded (server/training/rounds.py at
# c11911b): settings added since must not make its unfinished run look like another one.
PREVIOUS_RUN_SETTINGS = (
    "num_rounds", "strategy", "fraction_fit", "fraction_evaluate", "min_fit_clients", "min_evaluate_clients",
    "min_available_clients", "proximal_mu", "server_learning_rate", "server_momentum", "beta_1", "beta_2", "tau",
    "trim_fraction", "krum_malicious_clients", "krum_clients_to_keep", "local_epochs", "batch_size",
    "learning_rate", "dataset", "folder_path", "image_size", "image_channels", "partition", "dirichlet_alpha",
    "labels_per_client", "num_shards", "min_shard_size", "test_fraction", "max_examples", "seed",
)  # fmt: skip


def test_a_previous_versions_run_is_the_same_run_while_new_settings_keep_their_defaults() -> None:
    from server.training.rounds import RUN_SETTINGS, changed_settings
    from shared.settings import Settings

    current = Settings().fingerprint(RUN_SETTINGS)
    saved = Settings().fingerprint(PREVIOUS_RUN_SETTINGS)
    assert set(RUN_SETTINGS) > set(PREVIOUS_RUN_SETTINGS)  # settings were added since
    assert changed_settings(saved, current) == []
    assert changed_settings({**saved, "num_rounds": saved["num_rounds"] + 1}, current) == ["NUM_ROUNDS"]
    assert changed_settings(saved, {**current, "update_norm_limit": 5.0}) == ["UPDATE_NORM_LIMIT"]


def test_a_checkpoint_of_a_retired_rule_does_not_resume_under_another() -> None:
    from server.training.rounds import RUN_SETTINGS, changed_settings
    from shared.settings import Settings

    current = Settings(mode="async").fingerprint(RUN_SETTINGS)
    assert changed_settings({**current, "async_step": "fedbuff"}, current) == []
    assert changed_settings({**current, "async_step": "buffer-relative"}, current) == ["ASYNC_STEP"]
