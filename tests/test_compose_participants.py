"""Participants inside the federation, in Compose as a user runs it: three honest replicas of
`docker compose up --scale client=3` and, on the host, one plain Flower client (nothing of
Flowerpot's) that joins through the published port and, from round 8, sends the global model
plus a random direction of L2 norm 950. Under the old fixed UPDATE_NORM_LIMIT=1000 this took the
model to a true accuracy of 0.089 while the server exited 0; the shipped bounds refuse it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.compose import COMPOSE_FILE, Project, build_images, env_file_with
from compose_checks import docker_available, leftovers
from conftest import REPO, free_address

pytestmark = pytest.mark.compose


def wait_for_line(project: Project, service: str, text: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = project.logs(service)
        if text in log:
            return log
        time.sleep(1)
    raise AssertionError(f"{text!r} not in the {service} log after {timeout} s:\n{project.logs(service)[-3000:]}")


def test_a_boosted_update_from_a_plain_flower_client_is_refused_in_compose(tmp_path: Path) -> None:
    assert docker_available()
    build_images()
    port = free_address().rsplit(":", 1)[1]
    folder = env_file_with(tmp_path / "p", NUM_ROUNDS="15")
    p = Project(folder, files=(COMPOSE_FILE, REPO / "tests" / "compose" / "server-port.yml"), env={"SERVER_PORT": port})
    attacker = None
    try:
        assert p.compose("up", "-d", "--scale", "client=3").returncode == 0
        wait_for_line(p, "server", "round 1/15")
        attacker = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "plain_client.py"), f"127.0.0.1:{port}", "--boost-from", "8"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={"FLWR_TELEMETRY_ENABLED": "0"},
        )  # fmt: skip
        assert p.wait_exited("server", timeout=900) == [0], p.logs("server")[-4000:]
        log = p.logs("server")
        assert "(4 connected)" in log, log[-4000:]  # the attacker took part
        refused = [line for line in log.splitlines() if "refused the update of client" in line]
        assert refused and all("round 1:" not in line for line in refused), log[-4000:]
        assert p.wait_exited("client") == [0, 0, 0], p.logs("client")[-3000:]
        predicted = p.compose("run", "--rm", "predict", "--test-split", "--json", timeout=300)
        assert predicted.returncode == 0, predicted.stdout + predicted.stderr
        accuracy = json.loads(predicted.stdout)["accuracy"]
        assert accuracy >= 0.9, (accuracy, log[-4000:])  # the wrecked model's was 0.089
    finally:
        if attacker is not None:
            attacker.kill()
            attacker.communicate(timeout=30)
        p.down()
        assert leftovers(p) == {"container": [], "network": [], "volume": [], "image": []}
