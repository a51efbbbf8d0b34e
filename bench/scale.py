"""How many clients this machine carries through 3 rounds, as processes and as Compose replicas,
with peak memory (PSS) per client and for the server, and how round time grows."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.compose import Project, container_pid, env_file_with
from bench.federation import PeakPss, prepare, run_federation
from bench.overhead import round_seconds

ROUNDS = 3


def scale_settings(clients: int) -> dict[str, Any]:
    return {
        "NUM_SHARDS": clients,
        "MIN_SHARD_SIZE": 10,  # 1797 digits across up to 100 shards
        "NUM_ROUNDS": ROUNDS,
        "MIN_FIT_CLIENTS": clients,
        "MIN_EVALUATE_CLIENTS": clients,
        "MIN_AVAILABLE_CLIENTS": clients,
        "MAX_CLIENTS": clients,
        "START_TIMEOUT": 900,
        "LOCAL_EPOCHS": 1,
    }


def row_from(clients: int, ok: bool, seconds: float, history: list[dict], peaks: dict[str, float]) -> dict[str, Any]:
    client_peaks = [v for k, v in peaks.items() if k != "server"]
    return {
        "clients": clients,
        "ok": ok and len(history) == ROUNDS,
        "seconds": seconds,
        # with 3 rounds only the middle one has a next start; the mean round time covers all three
        "round_s": float(np.mean([r["seconds"] for r in history])) if history else None,
        "round_start_to_start_s": round_seconds(history)[:1] or None,
        "peak_pss_server_mb": peaks.get("server"),
        "peak_pss_client_mb_max": max(client_peaks, default=None),
        "peak_pss_client_mb_mean": float(np.mean(client_peaks)) if client_peaks else None,
    }


def memory_available_mb() -> float:
    with open("/proc/meminfo") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:")) / 1024


def too_big(clients: int, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A step that would need more memory than the machine has is not tried (it could take the
    machine down with it): the estimate is the last step's mean client PSS, plus a margin."""
    done = [r for r in rows if r.get("ok") and r.get("peak_pss_client_mb_mean")]
    if not done:
        return None
    needed = clients * done[-1]["peak_pss_client_mb_mean"] * 1.15 + (done[-1].get("peak_pss_server_mb") or 0)
    available = memory_available_mb()
    if needed <= 0.85 * available:
        return None
    return {
        "clients": clients,
        "ok": False,
        "skipped": f"needs about {needed / 1024:.1f} GiB, {available / 1024:.1f} GiB available",
    }


def climb(ladder: list[int], step: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run `step` for each client count until one fails, or would not fit in memory."""
    rows: list[dict[str, Any]] = []
    for clients in ladder:
        rows.append(too_big(clients, rows) or step(clients))
        if not rows[-1]["ok"]:
            break
    return rows


def local_ladder(workdir: Path, ladder: list[int]) -> list[dict[str, Any]]:
    def step(clients: int) -> dict[str, Any]:
        data = workdir / f"data-{clients}"
        settings = {"DATA_DIR": data, **scale_settings(clients)}
        prepare(data, **settings)
        outcome = run_federation(workdir / f"local-{clients}", clients, settings, timeout=1800)
        return row_from(clients, outcome.ok, outcome.seconds, outcome.history, outcome.peak_pss_mb)

    return climb(ladder, step)


def compose_ladder(workdir: Path, ladder: list[int]) -> list[dict[str, Any]]:
    def step(clients: int) -> dict[str, Any]:
        project = Project(env_file_with(workdir / f"compose-{clients}", **scale_settings(clients)), prefix="fpbench")
        try:
            started = time.monotonic()
            if project.compose("up", "-d", "--scale", f"client={clients}", timeout=900).returncode != 0:
                return {"clients": clients, "ok": False}
            with PeakPss() as memory:
                for container in project.containers():
                    if container["Service"] in ("server", "client") and container["State"] == "running":
                        memory.watch(container["Service"] + container["Name"], container_pid(container["Name"]))
                waited = project.compose("wait", "server", timeout=1800)
            seconds = time.monotonic() - started
            results = project.copy_results(workdir / f"compose-{clients}" / "results")
            history = json.loads((results / "history.json").read_text()) if (results / "history.json").is_file() else []
            peaks = {("server" if k.startswith("server") else k): v / 1024 for k, v in memory.peaks.items()}
            ok = waited.returncode == 0 and all(c == 0 for c in project.exit_codes("client"))
            return row_from(clients, ok, seconds, history, peaks)
        finally:
            project.down()

    return climb(ladder, step)
