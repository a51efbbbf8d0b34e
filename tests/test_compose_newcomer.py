"""A new user's path under Docker Compose, against a real engine: predicting after the run, a
typo in .env, the names in the log, a failed run seen from the clients.

Uses the images tests/test_compose.py's fixture builds (bench.compose.build_images: cached
layers make it quick when they are current). FLOWERPOT_SKIP_COMPOSE=1 skips these.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.compose import Project, build_images, env_file_with
from compose_checks import docker_available, leftovers

pytestmark = pytest.mark.compose

if os.environ.get("FLOWERPOT_SKIP_COMPOSE") == "1":
    pytest.skip("FLOWERPOT_SKIP_COMPOSE=1", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def images() -> None:
    assert docker_available(), "the Compose tests need a running Docker engine with Compose v2"
    build_images()


@pytest.fixture
def project(tmp_path: Path) -> Iterator:
    """project(NUM_ROUNDS="2"): a project in its own folder, with the committed .env changed so."""
    made: list[Project] = []

    def make(**settings: str) -> Project:
        made.append(Project(env_file_with(tmp_path / f"p{len(made)}", **settings)))
        return made[-1]

    yield make
    for p in made:
        p.down()
        assert leftovers(p) == {"container": [], "network": [], "volume": [], "image": []}


def write_digit(path: Path) -> None:
    """A dark-on-light 8 as a user would draw it (predict inverts it for digits)."""
    from PIL import Image

    pixels = np.full((32, 32), 255, dtype=np.uint8)
    for top in (4, 16):
        pixels[top : top + 12, 8:24] = 0
        pixels[top + 3 : top + 9, 12:20] = 255
    Image.fromarray(pixels).save(path)


def test_predict_uses_the_finished_run_and_starts_nothing(project, tmp_path: Path) -> None:
    p = project(NUM_ROUNDS="2")
    done, _ = p.up("--scale", "client=3", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    assert p.directory is not None
    write_digit(p.directory / "my_digit.png")

    ran = p.compose("run", "--rm", "predict", "my_digit.png", timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.startswith("my_digit.png\t")
    split = p.compose("run", "--rm", "predict", "--test-split", timeout=300)
    assert split.returncode == 0, split.stdout + split.stderr
    assert "all shards: accuracy" in split.stdout
    states = {c["Service"]: c["State"] for c in p.containers()}
    assert states == {"prepare": "exited", "server": "exited", "client": "exited"}  # nothing started, none left

    # What a user tries first: one line naming the command above; the finished run stays whole.
    tried = p.compose("run", "--rm", "client", "predict", "my_digit.png", timeout=300)
    assert tried.returncode == 2, tried.stdout + tried.stderr
    assert "run `docker compose run --rm predict IMAGE...`" in tried.stderr
    assert "Traceback" not in tried.stdout + tried.stderr
    p.compose("stop", "server", timeout=120)
    results = p.copy_results(tmp_path / "results")
    assert (results / "final_model.npz").is_file() and not (results / "previous").exists()


def test_a_misspelt_setting_stops_compose_up_before_any_training(project) -> None:
    p = project(NUM_ROUNDS="2")
    assert p.directory is not None
    env = p.directory / ".env"
    env.write_text(env.read_text().replace("NUM_ROUNDS=2", "NUM_ROUDS=2"))
    p.up("--scale", "client=3", timeout=600)
    assert p.exit_codes("prepare") == [2]
    assert "NUM_ROUDS is not a setting: did you mean NUM_ROUNDS? (in .env" in p.logs("prepare")
    assert p.exit_codes("server") == [2]  # the server reads the same file
    assert all(c["State"] != "running" and "claimed" not in p.logs("client") for c in p.containers())
