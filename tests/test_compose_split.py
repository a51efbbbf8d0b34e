"""The EC2 deployment of docs/deployment.md's "Deploy on EC2 with TLS", step by step on one machine: the
server on its own with its port published on the host, the clients as a separate Compose project
that knows only the published address, TLS and client certificates on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.compose import BUILT, Project, build_images, docker, env_file_with
from compose_checks import docker_available
from conftest import REPO, free_address

pytestmark = pytest.mark.compose


def test_split_deployment_with_tls_and_client_certificates(tmp_path: Path) -> None:
    assert docker_available()
    build_images()
    port = free_address().rsplit(":", 1)[1]
    secure = {"TLS_ENABLED": "true", "CLIENT_AUTH": "certificate", "NUM_ROUNDS": "2", "MIN_AVAILABLE_CLIENTS": "2"}

    # 1. On the VM: settings, then certificates for the server and one client credential "site-a".
    vm = env_file_with(tmp_path / "vm", **secure, ALLOWED_CLIENTS="site-a")
    for name in ("docker-compose.yml", "docker-compose.server.yml"):
        shutil.copy(REPO / name, vm)
    tools = Project(vm, files=(vm / "docker-compose.yml",))
    made = tools.compose("run", "--rm", "certs", "--client", "site-a", timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    assert (vm / "certs" / "server" / "server.pem").is_file()
    assert oct((vm / "certs" / "clients" / "site-a" / "client.key").stat().st_mode & 0o777) == "0o600"
    assert (vm / "certs" / "clients" / "site-a" / "client.key").stat().st_uid == 10001
    assert (
        (vm / "certs" / "ca" / "ca.key").stat().st_uid == (vm / "certs").stat().st_uid != 10001
    )  # never the containers'

    # 2. On the VM: the server alone, its port published on the host (here only on 127.0.0.1).
    server = Project(
        vm, files=(vm / "docker-compose.server.yml",), env={"SERVER_BIND": "127.0.0.1", "SERVER_PORT": port}
    )
    # 3. On a client machine: the client's bundle copied over, the clients pointed at the VM.
    site = env_file_with(tmp_path / "site-a", **secure, CLIENT_NAME="site-a")
    for name in ("docker-compose.yml", "docker-compose.client.yml"):
        shutil.copy(REPO / name, site)
    (site / "certs" / "clients").mkdir(parents=True)
    docker("run", "--rm", "-v", f"{vm / 'certs'}:/from:ro", "-v", f"{site / 'certs'}:/to", "--user", "0",
           "--entrypoint", "cp", BUILT["server"], "-a", "/from/clients/site-a", "/to/clients/")  # fmt: skip
    clients = Project(
        site,
        files=(site / "docker-compose.client.yml", REPO / "tests" / "compose" / "host-network.yml"),
        env={"SERVER_ADDRESS": f"127.0.0.1:{port}"},
    )
    try:
        # The published port requires TLS and client certificates (REQUIRE_TLS in docker-compose.server.yml).
        plain = server.compose("run", "--rm", "-e", "TLS_ENABLED=false", "-e", "CLIENT_AUTH=none", "server")
        assert plain.returncode == 2, plain.stdout + plain.stderr
        assert "REQUIRE_TLS=true but the server would run without TLS_ENABLED=true" in plain.stdout + plain.stderr
        assert server.compose("up", "-d").returncode == 0
        up = clients.compose("up", "--scale", "client=2", timeout=600)
        assert up.returncode == 0, up.stdout[-3000:]
        assert server.exit_codes("server") == [0], server.logs("server")  # the run ended with the clients
        server_log = server.logs("server")
        assert "(TLS, client certificates required)" in server_log
        joined = [
            line
            for line in server_log.splitlines()
            if "client site-a (certificate, serial" in line and "joined" in line
        ]
        assert len(joined) == 2
        assert "finished 2 rounds" in server_log
        assert clients.exit_codes("client") == [0, 0]
    finally:
        for project in (clients, server, tools):
            project.down()
