"""A federation of sites as real processes on loopback: each site prepares its own
DATA_DIR with its own SITE_SHARDS, and the server refuses, by name, what would silently spoil
the run: two clients training the same data, clients that disagree on their input, and clients
of another protocol version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import BASE_ENV, PLAIN_CLIENT, REPO, free_address, run_cli
from flowerpot.launcher import Process, clean_env
from shared.protocol import FLOWERPOT_VERSION, VERSION


def prepare_site(tmp_path: Path, name: str, **env: str) -> Path:
    """`flowerpot prepare` into tmp_path/NAME/data, as that site's machine would."""
    data = tmp_path / name / "data"
    result = run_cli(["prepare"], cwd=tmp_path, timeout=180, DATA_DIR=str(data), **env)
    assert result.returncode == 0, result.stderr
    return data


def server_env(tmp_path: Path, address: str, **overrides: str) -> dict[str, str]:
    return {
        **BASE_ENV,
        "RESULTS_DIR": str(tmp_path / "results"),
        "SERVER_LISTEN_ADDRESS": address,
        "SERVER_ADDRESS": address,
        **overrides,
    }


def test_two_sites_with_disjoint_shards_train_one_model(spawn, tmp_path: Path) -> None:
    """Same settings but SITE_SHARDS: the four shards are trained once each, as with one site."""
    address = free_address()
    shared = {"NUM_SHARDS": "4"}
    sites = {"site-a": "0-1", "site-b": "2-3"}
    data = {site: prepare_site(tmp_path, site, SITE_SHARDS=shards, **shared) for site, shards in sites.items()}
    manifests = {site: json.loads((d / "manifest.json").read_text()) for site, d in data.items()}
    assert [s["name"] for s in manifests["site-a"]["shards"]] == ["shard_000", "shard_001"]
    assert [s["name"] for s in manifests["site-b"]["shards"]] == ["shard_002", "shard_003"]
    checksums = [s["data_checksum"] for m in manifests.values() for s in m["shards"]]
    assert len(set(checksums)) == 4  # disjoint data

    env = server_env(tmp_path, address, **shared, NUM_ROUNDS="4", MIN_AVAILABLE_CLIENTS="4", MIN_FIT_CLIENTS="4")
    env["MIN_EVALUATE_CLIENTS"] = "4"
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    clients = [
        spawn(["client"], **env, DATA_DIR=str(data[site]), SITE_NAME=site, SITE_SHARDS=sites[site])
        for site in sites
        for _ in range(2)
    ]
    assert server.wait(timeout=600) == 0, server.output
    assert [c.wait() for c in clients] == [0, 0, 0, 0], [c.output for c in clients]

    rounds = json.loads((tmp_path / "results" / "history.json").read_text())
    final = rounds[-1]
    assert final["clients_trained"] == 4 and final["eval_accuracy"] >= 0.95, final
    held = sorted((c["site"], c["shard"]) for c in final["clients"] if c["phase"] == "evaluate")
    assert held == [
        ("site-a", "shard_000"),
        ("site-a", "shard_001"),
        ("site-b", "shard_002"),
        ("site-b", "shard_003"),
    ]
    assert "round 4 accuracy by site/shard: " in server.output and "site-b/shard_003" in server.output
    report = json.loads((tmp_path / "results" / "sites.json").read_text())
    accuracies = [c["accuracy"] for c in report["clients"]]
    assert report["worst"]["accuracy"] == min(accuracies) and report["best"]["accuracy"] == max(accuracies)
    assert report["spread"] == pytest.approx(max(accuracies) - min(accuracies))
    assert "per-client accuracy, round 4: worst" in server.output


def test_a_second_site_with_the_same_shards_is_refused_and_the_run_goes_on(spawn, tmp_path: Path) -> None:
    """Both sites prepared SITE_SHARDS=0-1: the same data. The first site's clients train; the
    second site's client is refused (exit 4) with a message naming the shard and the holder."""
    address = free_address()
    shared = {"NUM_SHARDS": "4", "SITE_SHARDS": "0-1"}
    data = {site: prepare_site(tmp_path, site, **shared) for site in ("site-a", "site-b")}
    env = server_env(tmp_path, address, **shared, MIN_AVAILABLE_CLIENTS="2", NUM_ROUNDS="2")
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    # site-a's first client takes shard_000; site-b's client claims its own shard_000: the same data
    first = [spawn(["client"], **env, DATA_DIR=str(data["site-a"]), SITE_NAME="site-a")]
    server.wait_for(r"\(1 connected\)", timeout=120)
    second = spawn(["client"], **env, DATA_DIR=str(data["site-b"]), SITE_NAME="site-b")
    assert second.wait(timeout=180) == 4, second.output
    refusal = second.output
    assert "error:" in refusal and "Traceback" not in refusal
    shard = second.wait_for(r"claimed (shard_00\d)").group(1)
    first.append(spawn(["client"], **env, DATA_DIR=str(data["site-a"]), SITE_NAME="site-a"))  # the run starts
    assert f"its shard {shard} of site site-b holds the same data" in refusal
    assert f"as shard {shard} that client" in refusal and "of site site-a is already training" in refusal
    assert server.wait(timeout=600) == 0, server.output
    assert [c.wait() for c in first] == [0, 0]
    rounds = json.loads((tmp_path / "results" / "history.json").read_text())
    assert {c["site"] for r in rounds for c in r["clients"]} == {"site-a"}


def make_folder(root: Path, classes: list[str], per_class: int = 12) -> Path:
    """A tiny image folder: one sub-folder per class, flat-coloured images told apart by class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((16, 16, 3), 40 * index + 20, np.uint8) + rng.integers(0, 10, (16, 16, 3), np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("site_b", "difference"),
    [
        ({"classes": ["cat", "dog", "fox"]}, "classes [cat, dog, fox] vs [cat, dog]"),
        ({"IMAGE_SIZE": "12"}, "IMAGE_SIZE 12x12 vs 8x8"),
    ],
    ids=["classes", "image-size"],
)
def test_folder_sites_that_disagree_on_their_input_are_refused_by_name(
    spawn, tmp_path: Path, site_b: dict, difference: str
) -> None:
    address = free_address()
    folder = {"DATASET": "folder", "IMAGE_SIZE": "8", "NUM_SHARDS": "1", "MIN_SHARD_SIZE": "2"}
    data = {}
    for site, overrides in (("site-a", {}), ("site-b", site_b)):
        pics = make_folder(tmp_path / site / "pics", overrides.get("classes", ["cat", "dog"]))
        env = {**folder, **{k: v for k, v in overrides.items() if k.isupper()}, "FOLDER_PATH": str(pics)}
        data[site] = (prepare_site(tmp_path, site, **env), env)
    env = server_env(tmp_path, address, MIN_AVAILABLE_CLIENTS="2", MAX_CLIENT_EXAMPLES="100")
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    first = spawn(["client"], **{**env, **data["site-a"][1]}, DATA_DIR=str(data["site-a"][0]), SITE_NAME="site-a")
    server.wait_for(r"\(1 connected\)", timeout=120)
    second = spawn(["client"], **{**env, **data["site-b"][1]}, DATA_DIR=str(data["site-b"][0]), SITE_NAME="site-b")
    assert second.wait(timeout=180) == 4, second.output
    assert "its input differs from the run's" in second.output and difference in second.output, second.output
    assert "Traceback" not in second.output
    assert difference in server.output  # the server's log names it too
    assert first.returncode is None  # the first site is untouched: it waits for the run


@pytest.mark.process
def test_prepare_labels_folders_in_the_order_of_classes_and_a_site_may_lack_one(tmp_path: Path) -> None:
    """CLASSES fixes the labels on every site: a site without `cat` still calls `dog` label 1."""
    pics = make_folder(tmp_path / "pics", ["dog", "fox"])
    env = {"DATASET": "folder", "FOLDER_PATH": str(pics), "IMAGE_SIZE": "8", "NUM_SHARDS": "1"}
    data = prepare_site(tmp_path, "site", **env, CLASSES="cat,dog,fox", MIN_SHARD_SIZE="2")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["spec"]["classes"] == ["cat", "dog", "fox"]
    assert manifest["spec"]["mean"] == [0.5, 0.5, 0.5] and manifest["spec"]["std"] == [0.25, 0.25, 0.25]
    assert set(manifest["shards"][0]["label_histogram"]) == {"1", "2"}


def test_a_plain_flower_client_joins_unchecked_with_one_warning(spawn, tmp_path: Path) -> None:
    address = free_address()
    env = server_env(tmp_path, address, MIN_AVAILABLE_CLIENTS="1", MIN_FIT_CLIENTS="1", MIN_EVALUATE_CLIENTS="1")
    env["NUM_ROUNDS"] = "2"
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    plain = Process("plain", [str(PLAIN_CLIENT), address], clean_env(), tmp_path)
    try:
        assert plain.wait(timeout=180) == 0, plain.output
    finally:
        plain.stop()
    assert server.wait(timeout=180) == 0, server.output
    assert server.output.count("sent no Flowerpot join metadata (a plain Flower client?)") == 1
    assert "per-client accuracy, round 2: worst 0.5000" in server.output


# A real Flowerpot client of protocol 99: what an old or new client looks like.
OTHER_VERSION_CLIENT = """
import sys
import shared.protocol
shared.protocol.VERSION = 99
from flowerpot.cli import main
sys.exit(main(["client"]))
"""


def test_a_client_of_another_version_is_refused(spawn, data_dir: Path, tmp_path: Path) -> None:
    address = free_address()
    env = server_env(tmp_path, address, START_TIMEOUT="120")
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    other = Process("other-version", ["-c", OTHER_VERSION_CLIENT], clean_env(**env, DATA_DIR=str(data_dir)), tmp_path)
    try:
        assert other.wait(timeout=180) == 4, other.output
    finally:
        other.stop()
    assert (
        f"it speaks protocol 99 (Flowerpot {FLOWERPOT_VERSION}), this server protocol {VERSION} "
        f"(Flowerpot {FLOWERPOT_VERSION}): run the same Flowerpot version" in other.output
    )
    assert "Traceback" not in other.output
    server.stop()


def test_the_version_constant_is_the_package_version() -> None:
    import tomllib

    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"] == FLOWERPOT_VERSION


def test_a_join_without_a_protocol_version_is_protocol_1_and_refused() -> None:
    """Flowerpot 0.1.0's clients sent no protocol key: their fit config is not this server's."""
    from flwr.server.superlink.fleet.grpc_bidi.grpc_bridge import GrpcBridge

    from server.transport.sites import Sites
    from server.transport.wiring import NamedClientProxy
    from shared.protocol import join_value

    fields = json.loads(join_value("site-a", "shard_000", "abc", {"dataset": "digits"}))
    assert fields["protocol"] == VERSION == 5
    del fields["protocol"]
    proxy = NamedClientProxy(cid="cid0", bridge=GrpcBridge(), name="client-0")
    refusal = Sites().enter(json.dumps(fields), "client-0", proxy)
    assert refusal is not None and refusal.startswith(
        f"it speaks protocol 1 (Flowerpot {FLOWERPOT_VERSION}), this server protocol {VERSION}"
    )
    assert Sites().enter(join_value("site-a", "shard_000", "abc", {"dataset": "digits"}), "client-0", proxy) is None


def test_a_client_that_died_rejoins_with_its_own_shard(federation, data_dir: Path, tmp_path: Path) -> None:
    """Killed mid-run and restarted (CLIENT_RESTARTS), a client comes back with the same shard:
    the data checksum is its own, so it takes its place again instead of being refused."""
    import os
    import signal

    from conftest import federation_env
    from flowerpot.launcher import descendants

    env = federation_env(data_dir, tmp_path, free_address(), NUM_ROUNDS="4", CLIENT_RESTARTS="1")
    env.update(MIN_AVAILABLE_CLIENTS="2", MIN_FIT_CLIENTS="2", MIN_EVALUATE_CLIENTS="2")
    run = federation(env, 2)
    run.server.wait_for("round 1/4", timeout=300)
    for pid in descendants(run.clients[1].popen.pid):
        os.kill(pid, signal.SIGKILL)
    assert run.server.wait(timeout=600) == 0, run.server.output
    assert [c.wait() for c in run.clients] == [0, 0], [c.output for c in run.clients]
    assert "already training" not in run.server.output
    assert len(run.clients[1].output.split("claimed shard_")) == 3  # claimed once, then again after the kill
