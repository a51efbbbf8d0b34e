"""Deployment cost under Docker Compose: image sizes, time from `up` to the first round and to
the end of the default job, and the per-round overhead with 3 replicas (ours, and bare Flower's
`start_server` run in the same place with the same clients)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.compose import BUILT, REPO, Project, build_images, env_file_with, image_size_mb
from bench.overhead import round_overheads, summary

# Bare Flower in the server's place: the client image has flwr; the reference script is mounted.
REFERENCE_OVERRIDE = """
services:
  server:
    image: ${{COMPOSE_PROJECT_NAME}}-client
    entrypoint: ["python", "-m", "bench.reference_server"]
    command: []
    volumes:
      - {bench}:/app/bench:ro
"""


def measure(workdir: Path, overhead_rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"build_s_cached": build_images()}
    # Keyed as in earlier reports: flowerpot-server, flowerpot-client.
    out["image_mb"] = {f"flowerpot-{kind}": image_size_mb(image) for kind, image in BUILT.items()}
    out["default_job"] = default_job(workdir / "default")
    out["overhead_3_clients"] = {}
    for name, reference in (("bare_flower", True), ("flowerpot", False)):
        out["overhead_3_clients"][name] = overhead(workdir / f"overhead-{name}", overhead_rounds, reference)
    ours, bare = (out["overhead_3_clients"][n]["overhead_s"]["median"] for n in ("flowerpot", "bare_flower"))
    out["overhead_3_clients"]["median_overhead_ratio"] = ours / bare if bare > 0 else float("nan")
    return out


def default_job(folder: Path) -> dict[str, Any]:
    """The committed .env as `docker compose up --scale client=3 -d` runs it, images built."""
    project = Project(env_file_with(folder), prefix="fpbench")
    try:
        started = time.monotonic()
        assert project.compose("up", "-d", "--scale", "client=3").returncode == 0
        first_round = None
        while first_round is None:
            if "starting 5 rounds" in project.logs("server"):
                first_round = time.monotonic() - started
            elif time.monotonic() - started > 600:
                raise RuntimeError(project.logs("server"))
            else:
                time.sleep(0.2)
        code = project.compose("wait", "server", timeout=900).returncode
        total = time.monotonic() - started
        results = project.copy_results(folder / "results")
        final = json.loads((results / "history.json").read_text())[-1]["eval_accuracy"]
    finally:
        project.down()
    return {"up_to_first_round_s": first_round, "total_s": total, "server_exit": code, "final_accuracy": final}


def overhead(folder: Path, rounds: int, reference: bool) -> dict[str, Any]:
    files = [REPO / "docker-compose.yml"]
    if reference:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "reference.yml").write_text(REFERENCE_OVERRIDE.format(bench=REPO / "bench"))
        files.append(folder / "reference.yml")
    project = Project(
        env_file_with(folder, NUM_ROUNDS=rounds, MIN_FIT_CLIENTS=3, MIN_EVALUATE_CLIENTS=3),
        tuple(files),
        prefix="fpbench",
    )
    try:
        assert project.compose("up", "-d", "--scale", "client=3").returncode == 0
        code = project.compose("wait", "server", timeout=900).returncode
        results = project.copy_results(folder / "results")
        history = json.loads((results / ("reference.json" if reference else "history.json")).read_text())
    finally:
        project.down()
    return {"ok": code == 0, "overhead_s": summary(round_overheads(history))}
