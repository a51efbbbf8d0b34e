"""Cross-device scale: hundreds to thousands of connected clients over the real transport, as
logical clients (CLIENTS_PER_PROCESS) of a few processes, and what each connected client costs.

Capacity: clients that train nothing (TASK=bench.idle_task, the built-in CNN's arrays), on the
generated data set, FRACTION_FIT = FRACTION_EVALUATE = 0.1 (the original design's 10 %), and one
row of 100 clients all sampled, which the target compares with 100 sampled of 1,000. Per row:
the server's PSS and threads listening alone and with every client connected and idle (before
its first round), so the cost of one connected idle client; the join storm (every logical client
is built first, then all join at once: from the first process's joining to the server's "N
connected"); the server's per-round time (start to next start, rounds 2 to N-1: the last round
evaluates every client); the client processes' PSS together. Bare Flower (`start_server`, plain
FedAvg, the same fraction) runs beside ours with the same clients where its gRPC pool
(max_concurrent_workers = 1,000, a stream each) can hold them.

Client memory: one process of N logical clients connected and idle, its PSS against N.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.federation import REFERENCE_SERVER, prepare, pss_kb
from bench.report import save_figure
from bench.scale import memory_available_mb
from flowerpot.launcher import SERVER, LocalFederation, descendants, free_port

ROUNDS = 10  # rounds 2 to 9 timed: a median of 8, since this machine is noisy
FRACTION = 0.1
# A join storm still going after this long is where the machine stops (the report says how far).
JOIN_LIMIT_S = 600.0
IDLE_SAMPLE_S = 5.0  # how long an idle federation's CPU use is sampled
FLOWER_POOL = 1000  # flwr's start_grpc_server(max_concurrent_workers=1000): one worker per stream


def threads(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("Threads:"))
    except (OSError, StopIteration):
        return 0


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def idle_cpu_percent(pids: list[int], seconds: float = IDLE_SAMPLE_S) -> list[float]:
    """Each process's CPU use over `seconds` in which nothing is asked of it (% of one core)."""
    before = [cpu_seconds(pid) for pid in pids]
    time.sleep(seconds)
    return [100 * (cpu_seconds(pid) - b) / seconds for pid, b in zip(pids, before)]


def anon_mb(pid: int) -> float:
    """Anonymous memory (heap, stacks): what the process itself allocated. Its PSS and even its
    private pages fall as client processes start and share its libraries' pages; this grows only
    with what it holds."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("Anonymous:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def tree_pss_mb(pid: int) -> float:
    return sum(pss_kb(p) for p in [pid, *descendants(pid)]) / 1024


def data_for(workdir: Path, clients: int) -> tuple[Path, dict[str, Any]]:
    """Synthetic shards for `clients`, prepared once: enough images for 30 per shard."""
    data = workdir / f"data-{clients}"
    settings = {
        "DATASET": "synthetic",
        "SYNTHETIC_EXAMPLES": max(60_000, 30 * clients),
        "NUM_SHARDS": clients,
        "DATA_DIR": data,
    }
    if not data.is_dir():
        prepare(data, **settings)
    return data, settings


def per_process(clients: int) -> int:
    """Logical clients per process: 250 (the issue's 4 x 250 = 1,000), 1,000 from 10,000 on (fewer
    PyTorch runtimes: 10 processes instead of 40)."""
    return 1000 if clients >= 10_000 else min(250, clients)


def connected_now(port: int) -> int | None:
    """The server's own count of connected clients (its live-metrics gauge), or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    found = re.search(r"^flowerpot_connected_clients\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    return int(float(found.group(1))) if found else None


def capacity_row(workdir: Path, clients: int, fraction: float, reference: bool = False) -> dict[str, Any]:
    """All but one of `clients` connect and sit idle (the server waits for the last, which the
    bench adds once they are measured), then ROUNDS rounds with `fraction` sampled."""
    _, data_settings = data_for(workdir, clients)
    each = per_process(clients)
    port = free_port()
    settings = {
        **data_settings,
        "RESULTS_DIR": workdir / f"results-{clients}-{fraction}-{'bare' if reference else 'ours'}",
        "TASK": "bench.idle_task",
        "NUM_ROUNDS": ROUNDS,
        "LOCAL_EPOCHS": 1,
        "MAX_CLIENTS": clients,
        "MIN_AVAILABLE_CLIENTS": clients,
        "MIN_FIT_CLIENTS": 2,
        "MIN_EVALUATE_CLIENTS": 2,
        "FRACTION_FIT": fraction,
        "FRACTION_EVALUATE": fraction,
        "CLIENTS_PER_PROCESS": each,
        "START_TIMEOUT": 1800,
        "CONNECT_TIMEOUT": 900,
        "ROUND_TIMEOUT": 900,
        "METRICS_PORT": port,  # the server's own count of connected clients, polled
    }
    row: dict[str, Any] = {
        "clients": clients, "fraction": fraction, "server": "bare Flower" if reference else "Flowerpot",
        "processes": math.ceil(clients / each), "per_process": each, "ok": False,
    }  # fmt: skip
    settings["RESULTS_DIR"].mkdir(parents=True, exist_ok=True)
    federation = LocalFederation(
        settings, cwd=workdir, server_args=REFERENCE_SERVER if reference else SERVER, log_dir=settings["RESULTS_DIR"]
    )
    started = time.monotonic()
    peak_clients = 0.0
    code = -1
    with federation:
        server = federation.start_server(wait_seconds=120)
        time.sleep(1.0)
        row.update(server_anon_listening_mb=anon_mb(server.pid), server_threads_listening=threads(server.pid))
        # All but one join first (NUM_SHARDS and MAX_CLIENTS stop at 10,000): measured idle, then
        # the last one starts the run. Bare Flower shows no count: it gets the last one at once.
        idle = clients - 1
        sizes = [min(each, idle - i * each) for i in range(math.ceil(idle / each))]
        procs = [federation.start_client(CLIENTS_PER_PROCESS=n) for n in sizes]
        if reference:
            procs.append(federation.start_client(CLIENTS_PER_PROCESS=1))
        first_joining = last_joining = None
        deadline = time.monotonic() + 1800
        join_deadline = time.monotonic() + JOIN_LIMIT_S
        last_count = 0
        while time.monotonic() < deadline and server.returncode is None:
            joining = [p for p in procs if "joining the server" in p.output]
            if joining and first_joining is None:
                first_joining = time.monotonic()
            if len(joining) == len(procs) and last_joining is None:
                last_joining = time.monotonic()
            if reference:
                break  # bare Flower shows no count of its clients: measured during its run only
            else:
                last_count = connected_now(port) or last_count
                if last_count >= idle:
                    now = time.monotonic()
                    row.update(
                        join_storm_s=now - (first_joining or now), join_after_last_process_s=now - (last_joining or now)
                    )
                    break
            if time.monotonic() > join_deadline:  # where it stops: say how far it got, and stop it
                row.update(
                    stopped=f"{last_count:,} of {clients:,} connected after {JOIN_LIMIT_S:.0f} s",
                    connected_at_stop=last_count,
                    server_anon_at_stop_mb=anon_mb(server.pid),
                    server_threads_at_stop=threads(server.pid),
                    client_pss_total_mb=sum(tree_pss_mb(p.pid) for p in procs),
                )
                for proc in procs:
                    proc.kill()
                server.kill()
                break
            time.sleep(0.2)
        if "stopped" not in row and server.returncode is None and not reference:
            cpu = idle_cpu_percent([server.pid, *(p.pid for p in procs)])
            row.update(
                server_anon_connected_mb=anon_mb(server.pid),
                server_threads_connected=threads(server.pid),
                server_idle_cpu_percent=cpu[0],
                clients_idle_cpu_percent=sum(cpu[1:]),
                client_pss_idle_mb=sum(tree_pss_mb(p.pid) for p in procs),
            )
            procs.append(federation.start_client(CLIENTS_PER_PROCESS=1))  # the last one: the run starts
        while server.returncode is None and time.monotonic() < deadline:
            peak_clients = max(peak_clients, sum(tree_pss_mb(p.pid) for p in procs))
            row["server_anon_peak_mb"] = max(row.get("server_anon_peak_mb", 0.0), anon_mb(server.pid))
            time.sleep(0.5)
        code = federation.wait(timeout=max(1.0, deadline - time.monotonic()), client_grace=60)
    row["seconds"] = time.monotonic() - started
    if "stopped" in row:
        return row
    row["client_pss_total_mb"] = peak_clients
    history_file = settings["RESULTS_DIR"] / ("reference.json" if reference else "history.json")
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    starts = [r["started_at"] for r in history]
    per_round = [b - a for a, b in itertools.pairwise(starts)][1:]  # rounds 2 .. N-1
    row.update(ok=code == 0 and len(history) == ROUNDS, rounds=len(history))
    row["round_s"] = float(np.median(per_round)) if per_round else None
    if not reference and history:
        row["trained_per_round"] = float(np.median([r["clients_trained"] for r in history]))
    if row.get("server_anon_connected_mb") is not None:
        row["server_kib_per_idle_client"] = (
            (row["server_anon_connected_mb"] - row["server_anon_listening_mb"]) * 1024 / (clients - 1)
        )
        row["server_threads_per_client"] = (row["server_threads_connected"] - row["server_threads_listening"]) / clients
    return row


def too_big(clients: int, rows: list[dict[str, Any]], memory: list[dict[str, Any]]) -> str | None:
    """Why `clients` is not tried (it could take the machine down): the client processes' PSS as
    one process's base plus each added logical client's (the memory rows), and the server's per
    connected client (the largest capacity row done), with a margin."""
    done = [r for r in rows if r.get("ok") and r["server"] == "Flowerpot" and r.get("server_kib_per_idle_client")]
    if not done or not memory:
        return None
    last = max(done, key=lambda r: r["clients"])
    base = memory[0]["pss_mb"]
    added = memory[-1].get("mb_per_added_client") or 0.0  # the largest process measured: its own rate
    server = last["server_anon_listening_mb"] + clients * max(last["server_kib_per_idle_client"], 0.0) / 1024
    needed = 1.15 * (math.ceil(clients / per_process(clients)) * base + clients * added + server)
    available = memory_available_mb()
    if needed <= 0.85 * available:
        return None
    return f"not tried: needs about {needed / 1024:.1f} GiB, {available / 1024:.1f} GiB available"


def client_memory(workdir: Path, counts: list[int]) -> list[dict[str, Any]]:
    """PSS of one client process of N logical clients, all connected and idle (the server waits
    for one more), and its threads."""
    rows = []
    for n in counts:
        _, data_settings = data_for(workdir, max(counts))
        settings = {
            **data_settings,
            "RESULTS_DIR": workdir / f"memory-{n}",
            "TASK": "bench.idle_task",
            "MAX_CLIENTS": n + 1,
            "MIN_AVAILABLE_CLIENTS": n + 1,
            "CLIENTS_PER_PROCESS": n,
            "START_TIMEOUT": 600,
            "METRICS_PORT": 0,
        }
        settings["RESULTS_DIR"].mkdir(parents=True, exist_ok=True)
        with LocalFederation(settings, cwd=workdir, log_dir=settings["RESULTS_DIR"]) as federation:
            server = federation.start_server(wait_seconds=120)
            client = federation.start_client()
            server.wait_for(rf"\({n} connected\)", timeout=600)
            time.sleep(2.0)
            client_cpu, server_cpu = idle_cpu_percent([client.pid, server.pid])
            rows.append({
                "logical_clients": n, "pss_mb": tree_pss_mb(client.pid), "threads": threads(client.pid),
                "idle_cpu_percent": client_cpu, "server_idle_cpu_percent": server_cpu,
            })  # fmt: skip
    one = rows[0]["pss_mb"] if rows and rows[0]["logical_clients"] == 1 else None
    for row in rows:
        if one is not None and row["logical_clients"] > 1:
            row["mb_per_added_client"] = (row["pss_mb"] - one) / (row["logical_clients"] - 1)
    return rows


def measure(workdir: Path, ladder: list[int], memory_counts: list[int]) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    memory = client_memory(workdir, memory_counts)  # first: it sizes the capacity rows' estimate
    capacity: list[dict[str, Any]] = []
    plan = [(ladder[0], 1.0)] + [(n, FRACTION) for n in ladder]
    for clients, fraction in plan:
        reason = too_big(clients, capacity, memory)
        if reason:
            capacity.append({"clients": clients, "fraction": fraction, "server": "Flowerpot", "ok": False,
                             "skipped": reason})  # fmt: skip
            continue
        capacity.append(capacity_row(workdir, clients, fraction))
        if clients <= FLOWER_POOL:
            capacity.append(capacity_row(workdir, clients, fraction, reference=True))
        else:
            capacity.append({
                "clients": clients, "fraction": fraction, "server": "bare Flower", "ok": False,
                "skipped": f"not tried: start_server's gRPC pool holds {FLOWER_POOL} streams (max_concurrent_workers)",
            })  # fmt: skip
    return {"capacity": capacity, "client_memory": memory, "rounds": ROUNDS}


def _row(res: dict[str, Any], clients: int, fraction: float, server: str = "Flowerpot") -> dict[str, Any] | None:
    return next(
        (r for r in res["capacity"] if r["clients"] == clients and r["fraction"] == fraction and r["server"] == server),
        None,
    )


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    big = _row(res, 1000, FRACTION)
    if big and big.get("ok"):
        total = big["client_pss_total_mb"]
        found.append({
            "target": "1,000 connected clients on this machine, every client process together under 8 GiB",
            "measured": f"{total / 1024:.2f} GiB in {big['processes']} processes of {big['per_process']}",
            "met": total < 8 * 1024,
        })  # fmt: skip
        small = _row(res, 100, 1.0)
        if small and small.get("round_s") and big.get("round_s"):
            ratio = big["round_s"] / small["round_s"]
            found.append({
                "target": "per-round time, 100 of 1,000 sampled (FRACTION_EVALUATE 0.1 too), within 1.5 x 100 of 100",
                "measured": f"{big['round_s']:.3f} s against {small['round_s']:.3f} s: {ratio:.2f} x",
                "met": ratio <= 1.5,
            })  # fmt: skip
        if big.get("server_kib_per_idle_client") is not None:
            found.append({
                "target": "server memory under 1 MiB per connected idle client (1,000 connected)",
                "measured": f"{big['server_kib_per_idle_client']:.0f} KiB",
                "met": big["server_kib_per_idle_client"] < 1024,
            })  # fmt: skip
    huge = _row(res, 10_000, FRACTION)
    if huge:
        found.append({
            "target": "ambition: 10,000 connected clients",
            "measured": huge.get("skipped")
            or (f"stopped: {huge['stopped']}" if huge.get("stopped") else None)
            or ("completed" if huge.get("ok") else f"failed after {huge.get('rounds')} rounds"),
            "met": bool(huge.get("ok")),
        })  # fmt: skip
    return found


def _f(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(res: dict[str, Any]) -> str:
    header = ["clients", "sampled", "server", "completed", "join storm s", "round s",
              "server heap MB alone / connected",
              "KiB per idle client", "server threads", "idle CPU % server / clients",
              "client PSS MB (all processes)"]  # fmt: skip
    rows = []
    for r in res["capacity"]:
        sampled = f"{r['fraction']:.0%}"
        if r.get("skipped"):
            rows.append([f"{r['clients']:,}", sampled, r["server"], r["skipped"], *["n/a"] * 7])
            continue
        if r.get("stopped"):
            at = r.get("connected_at_stop") or 1
            per = (r["server_anon_at_stop_mb"] - r["server_anon_listening_mb"]) * 1024 / at
            rows.append([
                f"{r['clients']:,}", sampled, r["server"], f"no: stopped, {r['stopped']}", "n/a", "n/a",
                f"{_f(r['server_anon_listening_mb'], 0)} / {_f(r['server_anon_at_stop_mb'], 0)} (at the stop)",
                _f(per, 0), f"{r['server_threads_listening']} / {r['server_threads_at_stop']}", "n/a",
                _f(r.get("client_pss_total_mb"), 0),
            ])  # fmt: skip
            continue
        rows.append([
            f"{r['clients']:,}", sampled, r["server"], "yes" if r["ok"] else f"no ({r.get('rounds')} rounds)",
            _f(r.get("join_storm_s"), 1), _f(r.get("round_s"), 3),
            f"{_f(r.get('server_anon_listening_mb'), 0)} / {_f(r.get('server_anon_connected_mb'), 0)}",
            _f(r.get("server_kib_per_idle_client"), 0),
            f"{r.get('server_threads_listening', 'n/a')} / {r.get('server_threads_connected', 'n/a')}",
            f"{_f(r.get('server_idle_cpu_percent'), 0)} / {_f(r.get('clients_idle_cpu_percent'), 0)}",
            _f(r.get("client_pss_total_mb"), 0),
        ])  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(x) + " |" for x in rows]
    memory = [
        "| logical clients | PSS MB | MB per added client | threads | idle CPU % (client / server) |",
        "|---|---|---|---|---|",
    ] + [
        f"| {m['logical_clients']} | {m['pss_mb']:.0f} | {_f(m.get('mb_per_added_client'))} | {m['threads']} | "
        f"{_f(m.get('idle_cpu_percent'), 0)} / {_f(m.get('server_idle_cpu_percent'), 0)} |"
        for m in res["client_memory"]
    ]
    return (
        "## Cross-device scale: connected clients and what each costs\n\n"
        f"Logical clients (`CLIENTS_PER_PROCESS`) that train nothing (`bench/idle_task.py`, the built-in CNN's arrays) "
        f'on the generated data set, {res["rounds"]} rounds; "round s" is the median from a round\'s start to the '
        "next, rounds 2 to N-1 (the last evaluates every client). With all but one of the row's clients connected "
        "and idle (the server waits for the last), the bench measures the server's heap (anonymous memory: "
        "its PSS falls as client processes share its libraries' pages), threads and CPU "
        f"use ({IDLE_SAMPLE_S:g} s, % of one core) and the client processes', then starts the last one (a process "
        "of one logical client) and the rounds begin. Bare Flower shows no count of its clients: it gets the last "
        "one at once, and only its rounds and its clients' peak PSS are measured. The join storm runs from the "
        "first process's \"joining the server\" to the server's own count (its live-metrics gauge) reaching all "
        "but one; every logical client is built "
        "before any joins. Client PSS: the processes' peak together.\n\n"
        + "\n".join(lines)
        + "\n\nOne client process against its number of logical clients, all connected and idle (the server waits "
        f"for one more); CPU use over {IDLE_SAMPLE_S:g} s of that idleness, % of one core:\n\n"
        + "\n".join(memory)
        + "\n"
    )


def plot(res: dict[str, Any], path: Path) -> Path:
    """Per-round time and memory against connected clients (the 10 %-sampled capacity rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for server, marker, colour in (("Flowerpot", "o", "tab:blue"), ("bare Flower", "s", "tab:orange")):
        done = sorted(
            (r for r in res["capacity"] if r["server"] == server and r["fraction"] == FRACTION and r.get("ok")),
            key=lambda r: r["clients"],
        )
        if done and all(r.get("round_s") for r in done):
            left.plot([r["clients"] for r in done], [r["round_s"] for r in done], marker=marker, color=colour,
                      label=server)  # fmt: skip
        every = [r for r in res["capacity"] if r["server"] == server and r["fraction"] == 1.0 and r.get("round_s")]
        if every:
            left.plot([r["clients"] for r in every], [r["round_s"] for r in every], marker=marker, ls="none",
                      mfc="none", color=colour, label=f"{server}, all sampled")  # fmt: skip
        if done:
            right.plot([r["clients"] for r in done], [r["client_pss_total_mb"] / 1024 for r in done], marker=marker,
                       color=colour, label=f"client processes, {server}")  # fmt: skip
        if server == "Flowerpot" and done:
            heap = [
                (r["clients"], r["server_anon_connected_mb"] / 1024) for r in done if r.get("server_anon_connected_mb")
            ]
            if heap:
                right.plot(*zip(*heap), marker="^", color="tab:green", label="server heap, all connected and idle")
    stopped = [r for r in res["capacity"] if r.get("stopped") and r["server"] == "Flowerpot"]
    for r in stopped:
        right.plot([r["connected_at_stop"]], [r["client_pss_total_mb"] / 1024], "x", color="red",
                   label=f"{r['clients']:,} tried: stopped at {r['connected_at_stop']:,} connected")  # fmt: skip
    left.set(xscale="log", xlabel="connected clients (10 % sampled unless marked)", ylabel="seconds per round (median)",
             title="per-round time, trivial training")  # fmt: skip
    right.set(xscale="log", xlabel="connected clients", ylabel="GiB (PSS; server: anonymous)",
              title="memory")  # fmt: skip
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
