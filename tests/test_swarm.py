"""docker-stack.yml on a real single-node Docker Swarm, driven by README's own commands.

The node stands for both kinds of machine: its labels place the server and the clients. The
test makes the swarm (and leaves it) only when the engine was not in one; it makes a CA and
certificates with `flowerpot certs`, hands them to Swarm as secrets, and runs with TLS and
client certificates, as the stack always does: what it tests is what a cluster runs. The
images must be current (built like tests/test_compose.py's). Everything it creates is named
after its own stack and removed at the end. `pytest -m "not compose"` leaves it out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bench.compose import BUILT, build_images, docker, env_file_with
from compose_checks import docker_available
from conftest import MEASUREMENTS, REPO, free_address, run_cli

# The stack's named volumes, as docker-stack.yml declares them: each is removed after a test.
STACK_VOLUMES = tuple(yaml.safe_load((REPO / "docker-stack.yml").read_text())["volumes"])

pytestmark = pytest.mark.compose

# docs/deployment.md "Docker Swarm", word for word, for a stack named `flowerpot` (test_readme_has_the_commands).
DEPLOY = "docker stack deploy --resolve-image never -c docker-stack.yml flowerpot"
WAIT = (
    "while docker service ps flowerpot_server --format '{{.CurrentState}}' "
    "| grep -qE '^(New|Pending|Assigned|Accepted|Ready|Preparing|Starting|Running)'; do sleep 5; done"
)
STATUS = "docker inspect --format '{{.Status.ContainerStatus.ExitCode}}' $(docker service ps -q flowerpot_server)"
RESULTS = (
    "mkdir -p results && docker run --rm --entrypoint tar -v flowerpot_results:/results:ro "
    "flowerpot-server:latest -C /results -c . | tar -x -C results"
)
REMOVE = "docker stack rm flowerpot"
REMOVED = "while docker network inspect flowerpot_default >/dev/null 2>&1; do sleep 1; done"
SECRETS = {
    "server_cert": "certs/server/server.pem",
    "server_key": "certs/server/server.key",
    "ca_cert": "certs/ca/ca.pem",
    "client_cert": "certs/clients/site-a/client.pem",
    "client_key": "certs/clients/site-a/client.key",
}
LABELS = ("flowerpot.server", "flowerpot.client")


def test_readme_has_the_commands() -> None:
    readme = (REPO / "docs" / "deployment.md").read_text()
    for command in (DEPLOY, WAIT, STATUS, RESULTS, REMOVE, REMOVED):
        assert command in readme, command
    for name, path in SECRETS.items():
        assert f"docker secret create flowerpot_{name} {path}" in readme


@pytest.fixture(scope="module")
def node() -> Iterator[str]:
    """This engine as a swarm node, without the labels (the tests add them); the swarm is left
    only if made here, labels the tests added are removed."""
    assert docker_available(), "the swarm test needs a running Docker engine"
    build_images()  # cached layers: seconds when the images are current
    made = docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() == "inactive"
    if made:
        docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    node_id = docker("info", "--format", "{{.Swarm.NodeID}}").stdout.strip()
    before = labels(node_id)
    assert not set(LABELS) & set(before), f"node {node_id} already has flowerpot labels: {before}"
    try:
        yield node_id
    finally:
        if made:
            docker("swarm", "leave", "--force")
        else:
            for label in set(labels(node_id)) & set(LABELS):
                docker("node", "update", "--label-rm", label, node_id)


def labels(node_id: str) -> dict[str, str]:
    return json.loads(docker("node", "inspect", "--format", "{{json .Spec.Labels}}", node_id).stdout) or {}


class Stack:
    """One deployment folder (docker-stack.yml, an edited .env, certificates) and its stack name."""

    def __init__(self, folder: Path, node_id: str) -> None:
        self.name = f"fpswarm-{uuid.uuid4().hex[:8]}"
        self.folder, self.node_id = folder, node_id
        self.env = {"FLOWERPOT_SECRETS": self.name, "SERVER_PORT": free_address().split(":")[1], "CLIENTS": "3"}
        # This checkout's images, which README's commands name flowerpot-server and -client.
        self.env |= {"SERVER_IMAGE": BUILT["server"], "CLIENT_IMAGE": BUILT["client"]}

    def sh(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A README command, for this stack's name."""
        command = re.sub(r"\bflowerpot(?=_|$|\s)", self.name, command)
        command = command.replace("docker secret create flowerpot_", f"docker secret create {self.name}_")
        command = command.replace("flowerpot-server:latest", BUILT["server"])
        return subprocess.run(
            ["bash", "-c", command],
            cwd=self.folder,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def tasks(self, service: str) -> list[dict[str, str]]:
        out = docker("service", "ps", "--no-trunc", "--format", "{{json .}}", f"{self.name}_{service}").stdout
        return [json.loads(line) for line in out.splitlines()]

    def exit_codes(self, service: str) -> list[int]:
        ids = docker("service", "ps", "-q", f"{self.name}_{service}").stdout.split()
        fmt = "{{.Status.ContainerStatus.ExitCode}}"
        return sorted(int(docker("inspect", "--format", fmt, i).stdout) for i in ids)

    def wait_done(self, service: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while any(
            t["CurrentState"].split()[0]
            in ("New", "Pending", "Assigned", "Accepted", "Ready", "Preparing", "Starting", "Running")
            for t in self.tasks(service)
        ):
            assert time.monotonic() < deadline, self.tasks(service)
            time.sleep(2)

    def logs(self, service: str) -> str:
        result = docker("service", "logs", "--raw", "--no-trunc", f"{self.name}_{service}")
        return result.stdout + result.stderr

    def remove(self) -> None:
        """The stack, then its volumes once its containers are gone, then its secrets."""
        self.sh(REMOVE, timeout=120)
        self.sh(REMOVED, timeout=120)
        deadline = time.monotonic() + 120
        for volume in (f"{self.name}_{v}" for v in STACK_VOLUMES):
            while docker("volume", "rm", volume, check=False).returncode != 0:
                if not docker("volume", "ls", "-q", "--filter", f"name=^{volume}$").stdout.strip():
                    break
                assert time.monotonic() < deadline, f"volume {volume} still in use"
                time.sleep(2)
        for name in SECRETS:
            docker("secret", "rm", f"{self.name}_{name}", check=False)

    def leftovers(self) -> dict[str, list[str]]:
        found = {}
        for kind in ("service", "network", "volume", "secret", "config"):
            names = docker(kind, "ls", "--format", "{{.Name}}").stdout.split()
            found[kind] = [n for n in names if n.startswith(self.name)]
        return found


@pytest.fixture
def stack(node: str, tmp_path: Path) -> Iterator[Stack]:
    folder = env_file_with(tmp_path / "deploy")  # the committed .env, as a user copies it
    shutil.copy(REPO / "docker-stack.yml", folder)
    made = run_cli(["certs", "--client", "site-a"], cwd=folder, CERTS_DIR="certs")
    assert made.returncode == 0, made.stderr
    s = Stack(folder, node)
    try:
        for name, path in SECRETS.items():
            created = s.sh(f"docker secret create flowerpot_{name} {path}")
            assert created.returncode == 0, created.stderr
        yield s
    finally:
        s.remove()
        assert s.leftovers() == {"service": [], "network": [], "volume": [], "secret": [], "config": []}


def test_three_replicas_complete_a_run_with_tls_and_run_again(stack: Stack, tmp_path: Path) -> None:
    started = time.monotonic()
    docker("node", "update", "--label-add", "flowerpot.client=true", stack.node_id)
    deployed = stack.sh(DEPLOY, timeout=180)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    # No node is labelled for the server yet: Swarm keeps it pending instead of placing it anywhere.
    deadline = time.monotonic() + 60
    while "no suitable node" not in (error := " ".join(t["Error"] for t in stack.tasks("server"))):
        assert time.monotonic() < deadline, stack.tasks("server")
        time.sleep(1)
    assert all(t["CurrentState"].startswith("Pending") for t in stack.tasks("server")), error
    docker("node", "update", "--label-add", "flowerpot.server=true", stack.node_id)

    assert stack.sh(WAIT, timeout=600).returncode == 0
    status = stack.sh(STATUS)
    assert status.stdout.strip() == "0", stack.logs("server")
    stack.wait_done("client")
    assert stack.exit_codes("client") == [0, 0, 0], stack.logs("client")
    assert stack.exit_codes("prepare") == [0]
    MEASUREMENTS["swarm: deploy to finished run (3 clients)"] = f"{time.monotonic() - started:.1f} s"

    server_log = stack.logs("server")
    assert "listening on 0.0.0.0:8080 (TLS, client certificates required)" in server_log
    joined = re.findall(r"client site-a \(certificate, serial \w+, [^)]*\) joined", server_log)
    assert len(joined) == 3  # each replica, with the certificate from the secrets
    assert "round 5/5: 3 trained, 0 failed" in server_log
    claimed = sorted(re.findall(r"claimed (shard_\d+)", stack.logs("client")))
    assert claimed == ["shard_000", "shard_001", "shard_002"]  # one each, on the node's volume

    assert stack.sh(RESULTS).returncode == 0
    rounds = json.loads((stack.folder / "results" / "history.json").read_text())
    assert len(rounds) == 5 and rounds[-1]["clients_trained"] == 3
    assert rounds[-1]["eval_accuracy"] >= 0.95
    assert sorted(d.name for d in (stack.folder / "results").glob("client_shard_*")) == [
        "client_shard_000",
        "client_shard_001",
        "client_shard_002",
    ]

    # Again, by the README's commands: the shards on the node are kept, the run starts anew.
    for command in (REMOVE, REMOVED, DEPLOY, WAIT):
        again = stack.sh(command, timeout=600)
        assert again.returncode == 0, command + again.stdout + again.stderr
    assert stack.sh(STATUS).stdout.strip() == "0", stack.logs("server")
    stack.wait_done("client")
    assert stack.exit_codes("client") == [0, 0, 0], stack.logs("client")
    assert "nothing to do" in stack.logs("prepare")
    assert "finished 5 rounds: final accuracy" in stack.logs("server")
