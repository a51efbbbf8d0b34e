"""Asynchronous training (MODE=async, FedBuff): real server and client processes on loopback."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest

from conftest import federation_env, free_address
from flowerpot.launcher import LocalFederation
from server.training.buffered import staleness_weight
from shared.modelfile import FINAL_MODEL, load_model

ASYNC = {"MODE": "async", "BUFFER_SIZE": "3", "LOCAL_EPOCHS": "2"}


def history(results: Path) -> list[dict]:
    return json.loads((results / "history.json").read_text())


def fitted_by(record: dict) -> list[str]:
    return [c["client"] for c in record["clients"] if c["phase"] == "fit"]


def test_staleness_weights() -> None:
    assert staleness_weight(3, "constant", 0.5) == 1.0
    assert staleness_weight(0, "polynomial", 0.5) == 1.0
    assert staleness_weight(3, "polynomial", 0.5) == pytest.approx(0.5)  # 1/sqrt(1+3)
    assert staleness_weight(1, "polynomial", 1.0) == pytest.approx(0.5)


def test_an_async_run_of_three_clients_reaches_095(federation, data_dir: Path, tmp_path: Path) -> None:
    env = federation_env(data_dir, tmp_path, free_address(), **ASYNC, NUM_ROUNDS="6")
    run = federation(env, 3)
    assert run.server.wait(240) == 0, run.server.output
    assert [c.wait(60) for c in run.clients] == [0, 0, 0], [c.output for c in run.clients]

    rounds = history(tmp_path / "results")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert all(r["clients_trained"] == 3 and r["staleness_max"] is not None for r in rounds)
    final = rounds[-1]
    assert final["eval_version"] == 6 and final["clients_evaluated"] == 3  # the final model, on every client
    assert final["eval_accuracy"] >= 0.95
    assert "version 6/6: 3 updates (staleness mean" in run.server.output
    header = (tmp_path / "results" / "history.csv").read_text().splitlines()[0]
    assert header.endswith("staleness_mean,staleness_max,updates_stale,eval_version")
    # Every client keeps the final model, as in sync mode.
    server_arrays, _ = load_model(tmp_path / "results" / FINAL_MODEL)
    for kept in sorted((tmp_path / "results").glob(f"client_shard_*/{FINAL_MODEL}")):
        arrays, _ = load_model(kept)
        assert all(np.array_equal(a, b) for a, b in zip(arrays, server_arrays, strict=True))
    # Two fits on one version are two different fits (fit_id seeds the client's shuffling).
    assert "version 0: trained on" in run.clients[0].output


def test_evaluation_comes_once_per_clients_worth_of_updates(federation, data_dir: Path, tmp_path: Path) -> None:
    """EVAL_EVERY empty: with 3 clients and a buffer of 1, every third version is evaluated (each
    client evaluates once per 3 updates, as in sync rounds of 3), not every version."""
    env = federation_env(data_dir, tmp_path, free_address(), **{**ASYNC, "BUFFER_SIZE": "1"}, NUM_ROUNDS="10")
    run = federation(env, 3)
    assert run.server.wait(240) == 0, run.server.output
    rounds = history(tmp_path / "results")
    measured = [r["eval_version"] for r in rounds[:-1] if r.get("eval_version") is not None]
    assert measured and all(v % 3 == 0 for v in measured), measured
    assert rounds[-1]["eval_version"] == 10


def local_run(data_dir: Path, tmp_path: Path, slowdowns: tuple[str, ...], **settings: str) -> tuple[str, list[dict]]:
    """A run with results in tmp_path/results and one client per CLIENT_SLOWDOWN in `slowdowns`
    (client-1, client-2, ...), all of which must exit 0; the server's output and the history."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = federation_env(data_dir, tmp_path, free_address(), **settings)
    with LocalFederation(env, cwd=tmp_path, address=env["SERVER_ADDRESS"]) as run:
        run.start_server()
        for slowdown in slowdowns:
            run.start_client(CLIENT_SLOWDOWN=slowdown)
        assert run.wait(240) == 0, run.server.output
        assert all(c.returncode == 0 for c in run.clients), [c.output for c in run.clients]
    return run.server.output, history(tmp_path / "results")


def with_a_slow_client(data_dir: Path, tmp_path: Path, **settings: str) -> tuple[str, list[dict]]:
    """An async run, buffer of 2, of client-1 four times slower than client-2 and client-3, each an
    emulated device of its own (12 x and 3 x their training's CPU time: on a loaded machine,
    sharing the cores stretches every client alike)."""
    return local_run(data_dir, tmp_path, ("12", "3", "3"), MODE="async", BUFFER_SIZE="2", **settings)


def test_versions_advance_while_a_slow_client_trains(data_dir: Path, tmp_path: Path) -> None:
    """The two fast clients make versions without the slow one, whose updates arrive late
    (staleness) but count."""
    _, rounds = with_a_slow_client(data_dir, tmp_path, NUM_ROUNDS="24", LOCAL_EPOCHS="2", MAX_STALENESS="100")
    with_slow = [r["round"] for r in rounds if "client-1" in fitted_by(r)]
    assert len(with_slow) >= 2, rounds
    between = [r for r in rounds if with_slow[0] < r["round"] < with_slow[1]]
    assert between and all("client-1" not in fitted_by(r) for r in between)  # versions advanced without it
    assert all(r["staleness_max"] >= 1 for r in rounds if r["round"] in with_slow)


def test_an_update_staler_than_max_staleness_is_dropped_and_counted(data_dir: Path, tmp_path: Path) -> None:
    output, rounds = with_a_slow_client(data_dir, tmp_path, NUM_ROUNDS="16", LOCAL_EPOCHS="4", MAX_STALENESS="0")
    assert sum(r["updates_stale"] for r in rounds) >= 1
    assert "dropped the update of client client-1: trained on version" in output
    assert "more than MAX_STALENESS=0" in output
    assert all(r["staleness_max"] == 0 for r in rounds)  # nothing staler was aggregated
    assert any(f"{r['updates_stale']} too stale" in output for r in rounds if r["updates_stale"])


def test_a_server_killed_mid_run_in_async_mode_resumes(spawn, federation, data_dir: Path, tmp_path: Path) -> None:
    env = federation_env(data_dir, tmp_path, free_address(), **ASYNC, NUM_ROUNDS="6", CONNECT_TIMEOUT="60")
    interrupted = federation(env, 3)
    first, clients = interrupted.server, interrupted.clients
    first.wait_for(r"version 3/6")
    first.popen.send_signal(signal.SIGKILL)
    first.wait()
    checkpointed = json.loads(np.load(tmp_path / "results" / "checkpoint.npz")["meta"].item())["round"]
    assert checkpointed >= 3

    second = spawn(["server"], **env)
    assert second.wait(240) == 0, second.output
    assert [c.wait(60) for c in clients] == [0, 0, 0]
    assert f"resuming the unfinished run at round {checkpointed + 1} of 6" in second.output
    rounds = history(tmp_path / "results")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert rounds[-1]["eval_accuracy"] >= 0.9


def test_a_server_optimizer_in_async_mode_with_one_update_per_version_is_sync(data_dir: Path, tmp_path: Path) -> None:
    """FedAdam takes the buffer's mean update as its pseudo-gradient: with one client and a buffer
    of one there is no staleness, and async mode must end bit for bit where sync mode does."""
    final = {}
    for mode in ("sync", "async"):
        one = {"MIN_AVAILABLE_CLIENTS": "1", "MIN_FIT_CLIENTS": "1", "MIN_EVALUATE_CLIENTS": "1"}
        local_run(data_dir, tmp_path / mode, ("1",), MODE=mode, BUFFER_SIZE="1", CONCURRENCY="1",
                  STRATEGY="fedadam", NUM_ROUNDS="4", LOCAL_EPOCHS="1", **one)  # fmt: skip
        final[mode], _ = load_model(tmp_path / mode / "results" / FINAL_MODEL)
        with np.load(tmp_path / mode / "results" / "checkpoint.npz") as checkpoint:
            assert {"state_m_t_0", "state_v_t_0"} <= set(checkpoint.files)  # its moments are kept
    assert all(np.array_equal(a, b) for a, b in zip(final["sync"], final["async"], strict=True))


def test_keep_all_models_saves_every_version(federation, data_dir: Path, tmp_path: Path) -> None:
    env = federation_env(data_dir, tmp_path, free_address(), **ASYNC, NUM_ROUNDS="3", KEEP_ALL_MODELS="true")
    run = federation(env, 3)
    assert run.server.wait(240) == 0, run.server.output
    kept = sorted(p.name for p in (tmp_path / "results" / "models").glob("*.npz"))
    assert kept == ["round_000001.npz", "round_000002.npz", "round_000003.npz"]
    final, _ = load_model(tmp_path / "results" / FINAL_MODEL)
    last, meta = load_model(tmp_path / "results" / "models" / "round_000003.npz")
    assert meta["round"] == 3 and all(np.array_equal(a, b) for a, b in zip(final, last, strict=True))


def test_clients_leave_and_join_mid_run(data_dir: Path, tmp_path: Path) -> None:
    """A client killed while training counts as a failed fit; a client that joins later (on the
    shard the killed one freed) gets the current model at once and its updates count."""
    env = federation_env(
        data_dir, tmp_path, free_address(), MODE="async", BUFFER_SIZE="2", NUM_ROUNDS="30", LOCAL_EPOCHS="3"
    )
    with LocalFederation(env, cwd=tmp_path, address=env["SERVER_ADDRESS"]) as run:
        run.start_server()
        doomed = run.start_client(CLIENT_SLOWDOWN="3")
        run.start_client()
        run.start_client()
        run.server.wait_for(r"version 3/30")
        doomed.wait_for(r"version \d+: trained on")  # it has trained once: kill it during a later fit
        doomed.kill()
        run.server.wait_for(r"the fit of client client-1 on version \d+ failed|client client-1 .* left", timeout=60)
        late = run.start_client(4)
        assert run.wait(240) == 0, run.server.output
    assert late.returncode == 0, late.output
    rounds = history(tmp_path / "results")
    assert [r["round"] for r in rounds] == list(range(1, 31))
    joined_at = next(r["round"] for r in rounds if "client-4" in fitted_by(r))
    assert joined_at < 30 and any("client-4" in fitted_by(r) for r in rounds if r["round"] > joined_at)
    assert rounds[-1]["clients_evaluated"] == 3  # the final model on the three connected clients
    assert rounds[-1]["eval_accuracy"] >= 0.9


def test_a_robust_buffer_holds_one_update_per_client(data_dir: Path, tmp_path: Path) -> None:
    """FedMedian of a buffer of 3: one fast client must not fill it with its own updates."""
    _, rounds = local_run(data_dir, tmp_path, ("1", "4", "4"), MODE="async", STRATEGY="fedmedian", BUFFER_SIZE="3",
                          MIN_FIT_CLIENTS="3", NUM_ROUNDS="4", LOCAL_EPOCHS="2")  # fmt: skip
    for record in rounds:
        assert sorted(fitted_by(record)) == ["client-1", "client-2", "client-3"], record["round"]


def test_when_no_update_is_ever_sound_the_versions_fail_and_the_run_ends(federation, data_dir, tmp_path) -> None:
    """NUM_ROUNDS bounds an async run also when the buffer can never fill."""
    env = federation_env(data_dir, tmp_path, free_address(), **ASYNC, NUM_ROUNDS="3", UPDATE_NORM_LIMIT="1e-9")
    run = federation(env, 3)
    code = run.server.wait(240)
    rounds = history(tmp_path / "results")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["failed"].startswith("no sound update of 3") for r in rounds), rounds
    assert all(r["updates_refused"] == 3 and r["clients_trained"] == 0 for r in rounds)
    assert run.server.output.count("version 2/3: 0 updates") == 1
    # A run that never trained does not report success (docs/security.md: exit status 7).
    assert code == 7, run.server.output
    assert "the run FAILED: its last 3 rounds all failed" in run.server.output


def test_an_async_run_speaks_of_versions_and_prints_no_empty_evaluation(
    federation, data_dir: Path, tmp_path: Path
) -> None:
    """One vocabulary per mode: no "round" in an async run's log, server or client, and a version
    nobody evaluated says nothing about evaluation."""
    env = federation_env(
        data_dir, tmp_path, free_address(), **ASYNC, NUM_ROUNDS="3", FRACTION_EVALUATE="0", MIN_EVALUATE_CLIENTS="0"
    )
    run = federation(env, 3)
    assert run.server.wait(240) == 0, run.server.output
    assert [c.wait(60) for c in run.clients] == [0, 0, 0], [c.output for c in run.clients]
    logs = "\n".join([run.server.output, *(c.output for c in run.clients)])
    assert "version 3/3: " in run.server.output and "finished 3 versions" in run.server.output
    assert "version 3 accuracy by site/shard" in run.server.output
    assert "per-client accuracy, version 3: worst" in run.server.output
    assert re.search(r"version \d+: trained on \d+ examples", run.clients[0].output)
    assert not re.search(r"\bround\b", logs), [line for line in logs.splitlines() if re.search(r"\bround\b", line)]
    assert "n/a (0 clients)" not in logs


def test_the_final_evaluation_does_not_wait_for_a_straggler_past_its_timeout(data_dir: Path, tmp_path: Path) -> None:
    """A client whose one fit outlasts the run: the final report leaves it out (named) after
    FINAL_EVAL_TIMEOUT instead of waiting, and it still gets the final model when its fit ends.
    Its fit takes 400 x its CPU time, about 25 s: a loaded machine stretches the others' run, not
    its sleep, and 150 x (10 s) was once short enough to arrive in time."""
    output, rounds = local_run(
        data_dir, tmp_path, ("400", "3", "3"), MODE="async", BUFFER_SIZE="2", NUM_ROUNDS="4", LOCAL_EPOCHS="1",
        FINAL_EVAL_TIMEOUT="5",
    )  # fmt: skip
    final = rounds[-1]
    assert final["round"] == 4 and final["clients_evaluated"] == 2, final
    assert "the final evaluation leaves out 1 client(s) busy after FINAL_EVAL_TIMEOUT=5 s: client-1" in output
    finished = output.index("finished 4 versions")
    assert output.index("the final model went also to client-1", finished) > finished
    server_arrays, _ = load_model(tmp_path / "results" / FINAL_MODEL)
    kept = sorted((tmp_path / "results").glob(f"client_shard_*/{FINAL_MODEL}"))
    assert len(kept) == 3
    for path in kept:
        arrays, _ = load_model(path)
        assert all(np.array_equal(a, b) for a, b in zip(arrays, server_arrays, strict=True))
