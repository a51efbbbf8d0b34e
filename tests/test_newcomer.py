"""A new user's path, as local processes: what they hit on the first day (predicting after a run,
a typo in .env, a second run, the help texts), each with what they should see."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PLAIN_CLIENT, federation_env, free_address, run_cli
from flowerpot.launcher import clean_env, free_port
from shared.errors import ExitCode

# Every test here runs the CLI (or git) as a process.
pytestmark = pytest.mark.process


def test_a_server_whose_run_never_starts_moves_no_results(tmp_path: Path) -> None:
    """A finished run's results stay where predict looks for them until a new run really starts."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "final_model.npz").write_bytes(b"the finished run's model")
    (results / "history.json").write_text("[]")
    ran = run_cli(
        ["server"],
        cwd=tmp_path,
        RESULTS_DIR=results,
        SERVER_LISTEN_ADDRESS=free_address(),
        MIN_AVAILABLE_CLIENTS="3",
        START_TIMEOUT="2",
    )
    assert ran.returncode == 6, ran.stderr
    assert sorted(p.name for p in results.iterdir()) == ["final_model.npz", "history.json"]
    assert (results / "final_model.npz").read_bytes() == b"the finished run's model"


def test_predict_takes_the_last_finished_run_while_a_new_one_goes_on(data_dir: Path, tmp_path: Path) -> None:
    """A run that started moved the finished one to previous/: predict's default is still its model."""
    finished = tmp_path / "results" / "previous" / "20260101-120000" / "final_model.npz"
    finished.parent.mkdir(parents=True)
    made = run_cli(["init-model", "--out", str(finished)], cwd=tmp_path, DATA_DIR=data_dir)
    assert made.returncode == 0, made.stderr
    ran = run_cli(["predict", "--test-split"], cwd=tmp_path, DATA_DIR=data_dir, RESULTS_DIR=tmp_path / "results")
    assert ran.returncode == 0, ran.stderr
    assert f"the model of the last finished run, {finished}" in ran.stderr
    assert "accuracy" in ran.stdout


def test_predict_in_the_compose_client_service_names_the_command_to_use(tmp_path: Path) -> None:
    ran = run_cli(
        ["predict", "my_digit.png"],
        cwd=tmp_path,
        RESULTS_DIR=tmp_path / "results",
        FLOWERPOT_PREDICT_WITH="docker compose run --rm predict",
    )
    assert ran.returncode == 2
    assert ran.stderr.count("\n") == 1 and "Traceback" not in ran.stderr
    assert "run `docker compose run --rm predict IMAGE...`" in ran.stderr
    assert not (tmp_path / "results").exists()


def test_a_misspelt_setting_in_env_stops_before_any_work(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("NUM_ROUDS=3\nDATA_DIR=data\n")
    ran = run_cli(["prepare"], cwd=tmp_path)
    assert ran.returncode == 2
    assert ran.stderr.count("\n") == 1 and "NUM_ROUDS is not a setting: did you mean NUM_ROUNDS?" in ran.stderr
    assert not (tmp_path / "data").exists()


def test_a_retired_setting_is_refused_unless_it_asks_for_what_this_version_does(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("ASYNC_STEP=buffer-relative\nDATA_DIR=data\n")
    ran = run_cli(["prepare"], cwd=tmp_path)
    assert ran.returncode == 2 and ran.stderr.count("\n") == 1 and "Traceback" not in ran.stderr
    assert "ASYNC_STEP=buffer-relative is no longer offered" in ran.stderr and "remove that line" in ran.stderr
    assert not (tmp_path / "data").exists()
    (tmp_path / ".env").write_text("ASYNC_STEP=fedbuff\n")  # what runs anyway: read as meant
    ran = run_cli(["predict"], cwd=tmp_path)
    assert ran.returncode == 2 and "ASYNC_STEP" not in ran.stderr and "give image files" in ran.stderr
    (tmp_path / ".env").write_text("")
    ran = run_cli(["predict"], cwd=tmp_path, ASYNC_STEP="Buffer-Relative")
    assert ran.returncode == 2 and "ASYNC_STEP=Buffer-Relative is no longer offered" in ran.stderr


def test_compose_only_and_docker_keys_are_not_typos(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "COMPOSE_PROJECT_NAME=mine\nDOCKER_HOST=unix:///x\nCLIENT_CPUS=1\nGRAFANA_PORT=3001\nexport NUM_ROUNDS=2\n"
    )
    ran = run_cli(["predict"], cwd=tmp_path)  # reads .env, then asks for images: status 2, another message
    assert ran.returncode == 2 and "is not a setting" not in ran.stderr and "give image files" in ran.stderr


def test_the_tests_read_the_committed_env_not_the_working_copy(tmp_path: Path) -> None:
    """README's tuning step edits .env; what the tests compare against stays the commit's."""
    import subprocess

    from bench.compose import committed_env
    from conftest import REPO

    committed = subprocess.run(["git", "-C", str(REPO), "show", "HEAD:.env"], capture_output=True, text=True)
    assert committed.returncode == 0  # a git checkout, as the tests run in
    assert committed_env() == committed.stdout


def test_every_command_help_says_what_it_does(tmp_path: Path) -> None:
    from flowerpot.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in commands:
        ran = run_cli([name, "--help"], cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr
        first = ran.stdout.split("\n\n")[1]  # after the usage lines
        assert first[0].isupper() and first.rstrip().endswith("."), (name, first)


def test_a_second_run_local_says_a_run_is_already_going(spawn, data_dir: Path, tmp_path: Path) -> None:
    """Not that METRICS_PORT is taken: that a run already uses this RESULTS_DIR."""
    env = federation_env(data_dir, tmp_path, free_address(), METRICS_PORT=str(free_port()), START_TIMEOUT="60")
    first = spawn(["server"], **env)
    first.wait_for("listening on")
    second = run_cli(["run-local", "--clients", "1"], cwd=tmp_path, timeout=120, **env)
    assert second.returncode == 2, second.stderr
    assert "a run is already going in RESULTS_DIR=" in second.stderr
    assert "METRICS_PORT=" not in second.stderr.split("a run is already going")[0]
    assert "Traceback" not in second.stderr
    assert first.returncode is None  # the first run goes on


def test_a_client_without_site_name_takes_the_default_site_compose_gives(spawn, data_dir: Path, tmp_path: Path) -> None:
    """Under Compose a replica's host name is a container id, new every run: the site is the
    project's name instead (FLOWERPOT_DEFAULT_SITE, set in docker-compose.yml)."""
    one = {"MIN_AVAILABLE_CLIENTS": "1", "MIN_FIT_CLIENTS": "1", "MIN_EVALUATE_CLIENTS": "1", "NUM_ROUNDS": "1"}
    env = federation_env(data_dir, tmp_path, free_address(), **one)
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    spawn(["client"], **env, FLOWERPOT_DEFAULT_SITE="myproject")
    assert server.wait(120) == 0, server.output
    assert "round 1 accuracy by site/shard: myproject/shard_" in server.output
    compose = (Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text()
    assert "FLOWERPOT_DEFAULT_SITE: ${COMPOSE_PROJECT_NAME}" in compose


def test_a_client_of_a_run_the_server_gave_up_exits_with_run_incomplete(spawn, data_dir: Path, tmp_path: Path) -> None:
    """The server times out waiting for a second client: the one that came does not exit 0."""
    env = federation_env(data_dir, tmp_path, free_address(), MIN_AVAILABLE_CLIENTS="2", START_TIMEOUT="4")
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    client = spawn(["client"], **env)
    assert server.wait(120) == ExitCode.CLIENTS_TIMEOUT, server.output
    assert client.wait(120) == 8, client.output
    assert ExitCode(8).name == "RUN_INCOMPLETE"
    assert "ended the run before it completed" in client.output
    assert "Traceback" not in client.output


def test_clients_of_a_completed_run_exit_0_a_plain_flower_client_too(spawn, data_dir: Path, tmp_path: Path) -> None:
    """The server's final instruction says the run completed; a plain Flower client answers it."""
    one = {"MIN_AVAILABLE_CLIENTS": "1", "MIN_FIT_CLIENTS": "1", "MIN_EVALUATE_CLIENTS": "1", "NUM_ROUNDS": "1"}
    env = federation_env(data_dir, tmp_path, free_address(), **one)
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    client = spawn(["client"], **env)
    assert server.wait(120) == 0, server.output
    assert client.wait(60) == 0, client.output
    assert "the run completed; shard_" in client.output

    env = federation_env(data_dir, tmp_path / "plain", free_address(), **one)
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    plain = subprocess.Popen([sys.executable, str(PLAIN_CLIENT), env["SERVER_ADDRESS"]], env=clean_env())
    try:
        assert plain.wait(120) == 0
        assert server.wait(60) == 0, server.output
    finally:
        plain.kill()
        plain.wait()
