"""README's "Several client sites" on one machine: one server project with its port published,
and two client sites as two Compose projects of docker-compose.client.yml, each with its own
data volume and its own SITE_SHARDS, the same .env otherwise. Then the same shards on both
sites: the second site's client is refused by name (status 4) and the run goes on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.compose import Project, build_images, env_file_with
from compose_checks import docker_available
from conftest import REPO, free_address

pytestmark = pytest.mark.compose

# Plaintext on loopback, to keep the test about sites: TLS across sites is test_compose_split's.
COMMON = {"NUM_SHARDS": "4", "NUM_ROUNDS": "3", "ALLOW_INSECURE": "true"}


def server_project(tmp_path: Path, port: str, **settings: str) -> Project:
    vm = env_file_with(tmp_path / "vm", **{**COMMON, **settings})
    for name in ("docker-compose.yml", "docker-compose.server.yml"):
        shutil.copy(REPO / name, vm)
    return Project(vm, files=(vm / "docker-compose.server.yml",), env={"SERVER_BIND": "127.0.0.1", "SERVER_PORT": port})


def site_project(tmp_path: Path, name: str, port: str, site_shards: str, **settings: str) -> Project:
    site = env_file_with(tmp_path / name, **{**COMMON, **settings}, SITE_NAME=name, SITE_SHARDS=site_shards)
    for file in ("docker-compose.yml", "docker-compose.client.yml"):
        shutil.copy(REPO / file, site)
    return Project(
        site,
        files=(site / "docker-compose.client.yml", REPO / "tests" / "compose" / "host-network.yml"),
        env={"SERVER_ADDRESS": f"127.0.0.1:{port}"},
    )


def test_two_client_sites_with_their_own_shards_train_one_model(tmp_path: Path) -> None:
    assert docker_available()
    build_images()
    port = free_address().rsplit(":", 1)[1]
    server = server_project(tmp_path, port, MIN_AVAILABLE_CLIENTS="4", MIN_FIT_CLIENTS="4", MIN_EVALUATE_CLIENTS="4")
    sites = [site_project(tmp_path, "site-a", port, "0-1"), site_project(tmp_path, "site-b", port, "2-3")]
    try:
        assert server.compose("up", "-d").returncode == 0
        for site in sites:  # each site prepares only its shards, in its own data volume
            assert site.compose("up", "-d", "--scale", "client=2").returncode == 0
        for site in sites:
            assert site.wait_exited("client") == [0, 0], site.logs("client")[-3000:]
            prepared = site.logs("prepare")
            assert "wrote 2 shards" in prepared, prepared
        assert server.exit_codes("server") == [0], server.logs("server")
        log = server.logs("server")
        for held in ("site-a/shard_000", "site-a/shard_001", "site-b/shard_002", "site-b/shard_003"):
            assert held in log, log
        assert "per-client accuracy, round 3: worst" in log
        results = server.copy_results(tmp_path / "results")
        final = json.loads((results / "history.json").read_text())[-1]
        assert final["clients_trained"] == 4 and final["eval_accuracy"] >= 0.95
    finally:
        for project in (*sites, server):
            project.down()


def test_a_second_site_with_the_same_shards_is_refused(tmp_path: Path) -> None:
    assert docker_available()
    build_images()
    port = free_address().rsplit(":", 1)[1]
    server = server_project(tmp_path, port, MIN_AVAILABLE_CLIENTS="2", MIN_FIT_CLIENTS="2", MIN_EVALUATE_CLIENTS="2")
    first, second = site_project(tmp_path, "site-a", port, "0-1"), site_project(tmp_path, "site-b", port, "0-1")
    try:
        assert server.compose("up", "-d").returncode == 0
        assert first.compose("up", "-d", "--scale", "client=1").returncode == 0
        # the second site's one client claims shard_000 of its own volume: the data site-a trains
        refused = second.compose("up", "--scale", "client=1", "--no-log-prefix", timeout=600)
        assert second.exit_codes("client") == [4], refused.stdout[-3000:]
        assert "its shard shard_000 of site site-b holds the same data" in second.logs("client")
        assert first.compose("up", "-d", "--scale", "client=2").returncode == 0  # the run starts
        assert first.wait_exited("client") == [0, 0], first.logs("client")[-3000:]
        assert server.exit_codes("server") == [0], server.logs("server")
    finally:
        for project in (first, second, server):
            project.down()


def test_a_duplicate_of_a_live_site_is_refused_and_the_site_trains_on(tmp_path: Path) -> None:
    """A second project on the same machine with the same SITE_NAME and SITE_SHARDS (its own data
    volume, so its own copy of shard_000) used to push the healthy, training client out ("it
    replaces the old connection"); it is refused (status 4) naming the live client, and the
    site's client trains on."""
    from test_compose_participants import wait_for_line

    assert docker_available()
    build_images()
    port = free_address().rsplit(":", 1)[1]
    one = {"MIN_AVAILABLE_CLIENTS": "1", "MIN_FIT_CLIENTS": "1", "MIN_EVALUATE_CLIENTS": "1"}
    quick = {"NUM_ROUNDS": "100000", "KEEPALIVE_SECONDS": "5", "LOCAL_EPOCHS": "1"}
    server = server_project(tmp_path, port, **one, **quick)
    site = site_project(tmp_path, "site-a", port, "0", **quick)
    duplicate = site_project(tmp_path / "c", "site-a", port, "0", **quick)
    try:
        assert server.compose("up", "-d").returncode == 0
        assert site.compose("up", "-d", "--scale", "client=1").returncode == 0
        wait_for_line(server, "server", "round 2/100000")
        refused = duplicate.compose("up", "--scale", "client=1", "--no-log-prefix", timeout=600)
        assert duplicate.exit_codes("client") == [4], refused.stdout[-3000:]
        told = duplicate.logs("client")
        assert "shard shard_000 of site site-a is trained by client" in told and "whose connection is alive" in told
        log = server.logs("server")
        assert "replaces the old connection" not in log
        rounds = log.count(" trained, ")
        wait_for_line(server, "server", f"round {rounds + 3}/100000")  # the site trains on
        running = {c["Service"]: c["State"] for c in site.containers()}
        assert running["client"] == "running" and server.containers()[0]["State"] == "running"
    finally:
        for project in (duplicate, site, server):
            project.down()
