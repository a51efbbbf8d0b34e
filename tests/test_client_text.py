"""Text a client sends never forges a log line nor bloats the results: real processes on loopback,
one honest Flowerpot client and one whose site name and shard metric carry newlines and
thousands of characters (the shipped client refuses such a SITE_NAME at its start: the forger
builds its settings without that check)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conftest import federation_env, free_address, run_cli
from flowerpot.launcher import Process, clean_env

FORGED = "\nFORGED finished 2 rounds: final accuracy 0.9999"
FORGER = f"""
from pathlib import Path
from shared.logs import prepare_flower_environment

prepare_flower_environment()
from client import app
from shared.settings import Settings

FORGED = {FORGED!r}

class Forger(app.FlowerpotClient):
    def fit(self, parameters, config):
        trained, examples, metrics = super().fit(parameters, config)
        return trained, examples, {{**metrics, "shard": "shard" + FORGED + "y" * 3000}}

settings = Settings.load(None).model_copy(update={{"site_name": "site" + FORGED + "x" * 3000}})
app.FlowerpotClient = Forger
app.run_client(settings)
"""


def test_client_texts_are_cut_and_cleaned_before_logs_and_results(digits_shards: Path, tmp_path: Path) -> None:
    env = federation_env(
        digits_shards, tmp_path, free_address(), NUM_ROUNDS="2", MIN_AVAILABLE_CLIENTS="2", MIN_FIT_CLIENTS="2"
    )
    script = tmp_path / "forger.py"
    script.write_text(textwrap.dedent(FORGER))
    server = Process("server", ["-m", "flowerpot", "server"], clean_env(**env), tmp_path)
    clients: list[Process] = []
    try:
        server.wait_for("listening on", 120)
        clients.append(Process("honest", ["-m", "flowerpot", "client"], clean_env(**env, SHARD_ID="0"), tmp_path))
        clients.append(Process("forger", [str(script)], clean_env(**env, SHARD_ID="1", CLIENT_NAME="f"), tmp_path))
        assert server.wait(300) == 0, server.output
    finally:
        for proc in [*clients, server]:
            proc.stop()
    lines = server.output.splitlines()
    assert any("FORGED" in line for line in lines), server.output  # the site name is logged, cleaned
    assert not any(line.startswith("FORGED") for line in lines), server.output
    assert all("?FORGED" in line for line in lines if "FORGED" in line)
    assert "x" * 65 not in server.output and "y" * 65 not in server.output
    results = tmp_path / "results"
    for name in ("history.json", "history.jsonl", "sites.json"):
        if (results / name).is_file():
            text = (results / name).read_text()
            assert "x" * 65 not in text and "y" * 65 not in text and "\\nFORGED" not in text, name


@pytest.mark.process  # runs the client as a process
def test_an_overlong_or_multiline_site_or_client_name_is_refused_at_the_clients_start(tmp_path: Path) -> None:
    for setting, value in (("SITE_NAME", "s" * 7000), ("CLIENT_NAME", "c" * 65), ("SITE_NAME", "a\nb")):
        result = run_cli(["client"], cwd=tmp_path, **{setting: value})
        assert result.returncode == 2, (setting, result.stderr)
        message = result.stderr.strip()
        assert f"error: {setting}=" in message and "at most 64 printable characters" in message, message
        assert len(message) < 400 and "Traceback" not in message, message
