"""docker-stack.yml runs the same server, prepare and client as docker-compose.yml, changed only
where Docker Swarm needs it. Reads both files; no Docker engine needed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED = ("prepare", "server", "client")
# Settings the stack adds: TLS always (its port is published on the swarm), and a bounded wait
# for the node's prepare step (Swarm has no depends_on).
STACK_ONLY_ENVIRONMENT = {"REQUIRE_TLS", "TLS_ENABLED", "CLIENT_AUTH", "SHARDS_TIMEOUT"}
# What the Compose client says when asked to predict: the stack has no predict service.
COMPOSE_ONLY_ENVIRONMENT = {"FLOWERPOT_PREDICT_WITH", "FLOWERPOT_CHECK_ENV_FILE"}
# What Swarm rejects (depends_on conditions, profiles) or ignores (build, restart).
NOT_FOR_SWARM = {"depends_on", "profiles", "build", "restart"}


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / name).read_text())["services"]


@pytest.fixture(scope="module")
def services() -> tuple[dict[str, Any], dict[str, Any]]:
    return load("docker-compose.yml"), load("docker-stack.yml")


def mounts(service: dict[str, Any]) -> dict[str, bool]:
    """Volume target -> read-only, leaving out /certs (the stack's certificates are secrets) and
    /task (a swarm's nodes have no task folder: it is baked into the client image)."""
    found = {}
    for entry in service.get("volumes", []):
        _, target, *mode = re.sub(r"\$\{[^}]*\}", "VAR", entry).split(":")  # ${NAME:-default} has a colon
        found[target] = mode == ["ro"]
    return {t: ro for t, ro in found.items() if t not in ("/certs", "/etc/flowerpot/.env", "/task")}


def test_every_service_of_a_compose_run_is_in_the_stack(services) -> None:
    """client-slow (scale 0, an emulation for tests and benchmarks) is not needed on a swarm."""
    compose, stack = services
    assert {name for name, s in compose.items() if "profiles" not in s and s.get("scale") != 0} == set(SHARED)
    assert set(SHARED) <= set(stack)


def test_the_slow_client_is_the_client_with_a_slowdown(services) -> None:
    """The same image, never built for itself (nor pulled): prepare and client build it."""
    client, slow = services[0]["client"], services[0]["client-slow"]
    assert "build" not in slow and slow["pull_policy"] == "never"
    assert {k: v for k, v in slow.items() if k not in ("environment", "scale", "pull_policy")} == {
        k: v for k, v in client.items() if k not in ("environment", "build")
    }
    assert slow["environment"] == {**client["environment"], "CLIENT_SLOWDOWN": "${SLOW_CLIENT_SLOWDOWN:-4}"}
    assert slow["scale"] == 0


@pytest.mark.parametrize("name", SHARED)
def test_the_stack_runs_the_same_service(services, name: str) -> None:
    compose, stack = services[0][name], services[1][name]
    for key in ("command", "env_file", "init"):
        assert stack.get(key) == compose.get(key), key
    kind = "server" if name == "server" else "client"
    assert compose["image"] == f"${{COMPOSE_PROJECT_NAME}}-{kind}"  # a project's own, never another's
    # What `docker compose -p flowerpot build` makes, or the images pushed (SERVER_IMAGE, CLIENT_IMAGE).
    assert stack["image"] == f"${{{kind.upper()}_IMAGE:-flowerpot-{kind}:latest}}"
    assert set(compose["environment"]) - COMPOSE_ONLY_ENVIRONMENT <= set(stack["environment"])
    assert set(stack["environment"]) - set(compose["environment"]) <= STACK_ONLY_ENVIRONMENT
    assert mounts(stack) == mounts(compose)
    assert stack.get("healthcheck") == compose.get("healthcheck")
    assert not NOT_FOR_SWARM & set(stack)


@pytest.mark.parametrize("name", SHARED)
def test_swarm_never_restarts_a_stopped_container(services, name: str) -> None:
    """As in docker-compose.yml: a refused or shard-less client must stay stopped (crashes are
    restarted inside the container, CLIENT_RESTARTS)."""
    assert services[1][name]["deploy"]["restart_policy"] == {"condition": "none"}


def test_the_stack_requires_tls_with_certificates_from_secrets(services) -> None:
    stack = services[1]
    for name in SHARED:
        env = stack[name]["environment"]
        assert (env["REQUIRE_TLS"], env["TLS_ENABLED"], env["CLIENT_AUTH"]) == ("true", "true", "certificate")
        assert env["CERTS_DIR"] == "/run/secrets"  # where Swarm mounts secrets; read by bundle()
    targets = {name: {s["target"] for s in stack[name].get("secrets", [])} for name in SHARED}
    assert targets == {
        "prepare": set(),
        "server": {"server.pem", "server.key", "ca.pem"},
        "client": {"client.pem", "client.key", "ca.pem"},
    }
    for name in ("server", "client"):
        for secret in stack[name]["secrets"]:
            assert secret["uid"] == "10001"  # the images' user
            assert secret["mode"] == (0o400 if secret["target"].endswith(".key") else 0o444)


def test_nodes_are_chosen_by_label(services) -> None:
    stack = services[1]
    placement = {name: stack[name]["deploy"]["placement"]["constraints"] for name in SHARED}
    assert placement == {
        "server": ["node.labels.flowerpot.server == true"],
        "prepare": ["node.labels.flowerpot.client == true"],
        "client": ["node.labels.flowerpot.client == true"],
    }
    assert stack["prepare"]["deploy"]["mode"] == "global"  # one prepare per client node
    assert stack["client"]["environment"]["SHARDS_TIMEOUT"] == "600"
