"""The command line: one entry point, a --help for each sub-command, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli

COMMANDS = ["prepare", "server", "client", "predict", "run-local"]


@pytest.mark.process
def test_top_level_help_lists_commands_and_exit_statuses(tmp_path: Path) -> None:
    result = run_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    assert "3 no free" in result.stdout and "6 timed out waiting for clients" in result.stdout


@pytest.mark.process
@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(tmp_path: Path, command: str) -> None:
    result = run_cli([command, "--help"], cwd=tmp_path)
    assert result.returncode == 0
    assert f"usage: flowerpot {command}" in result.stdout


@pytest.mark.process
def test_predict_without_a_model_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli(["predict", "--test-split"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "flowerpot predict: error: no model at results/final_model.npz: "
        "train first, or point --model at a .npz model file"
    )


def test_predict_rejects_a_file_that_is_not_an_image(tmp_path: Path, digits_shards: Path) -> None:
    from client.data.shards import load_shard, shard_dirs
    from client.tasks import get_weights, load_task
    from shared.modelfile import save_model

    spec = load_shard(shard_dirs(digits_shards)[0]).spec
    save_model(tmp_path / "model.npz", get_weights(load_task().new_model(spec, seed=0)), {"spec": spec.to_json()})
    (tmp_path / "notes.png").write_text("not really a picture")
    result = run_cli(["predict", "--model", "model.npz", "notes.png"], cwd=tmp_path)
    assert result.returncode == 2
    assert "notes.png is not a readable image" in result.stderr


@pytest.mark.process
def test_missing_env_file_is_an_error(tmp_path: Path) -> None:
    result = run_cli(["--env-file", "nope.env", "server"], cwd=tmp_path)
    assert result.returncode == 2 and "nope.env does not exist" in result.stderr
