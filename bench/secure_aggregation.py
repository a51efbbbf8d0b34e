"""Secure aggregation (SECURE_AGGREGATION): what SecAgg+ costs a round against a plain one, and
what it does to accuracy.

Cost: the real gRPC server and client wiring in one process, with real participants (keys,
shares, masks) whose "training" returns an update of the built-in CNN's size (53,002 values), so
that the round is the protocol and nothing else: per-round wall time and bytes, secure against a
plain round of the same clients (their float32 updates through the guard and FedAvg), at 5 to 100
clients, with 0, 10 and 30 % of each round's clients dropping out after key sharing, for SecAgg
(every client a neighbour) and SecAgg+ (a ring of k in SECAGG_PLUS_NEIGHBOURS). Clients and server
share this process and its interpreter lock: the wall time is of the whole federation on one
machine, and the server's own share (unmasking) is reported beside it.

Accuracy: digits, 3 sites IID, FedAvg, secure against plain with the same seeds (paired per
seed: the aggregate differs only by quantization).
"""

from __future__ import annotations

import functools
import json
import logging
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import Code, FitIns, FitRes, ndarrays_to_parameters
from flwr.compat.client.numpy_client import NumPyClient
from flwr.proto.transport_pb2 import ClientMessage
from flwr.server import Server

from bench.federation import prepare, run_federation
from bench.report import mean_sd_text
from client import wiring
from client.secure_aggregation import Identity, Participant
from flowerpot.launcher import free_port
from server.training.secure_rounds import SecureAggregator
from server.training.strategies import build_strategy
from server.transport.admission import Admission, BoundedClientManager
from server.transport.wiring import Traffic, start_grpc_server
from shared import protocol
from shared import secure_aggregation as sa
from shared.settings import Settings

log = logging.getLogger("flowerpot.bench")

MODEL_SIZE = 53_002  # the built-in CNN's values on digits
MAX_WEIGHT = 1000
SEED = 7
CLIENTS = (5, 10, 20, 50, 100)
DROPOUTS = (0.0, 0.1, 0.3)
SECAGG_PLUS_NEIGHBOURS = (16, 32)  # SecAgg+'s k, where the round has more clients than k + 1


def true_update(index: int, size: int) -> np.ndarray:
    """Client `index`'s update: structured and its own (an unmasked one would be recognised)."""
    rng = np.random.default_rng(index)
    return np.sin(np.arange(size) / (index + 3)) * 0.3 + rng.normal(0, 0.2, size)


@dataclass
class ScriptedClient(NumPyClient):
    """A real participant whose fit returns a known update; `behaviour` makes it misbehave in
    the rounds of `rounds_misbehaving` (None: every round). It times its own protocol work."""

    participant: Participant
    delta: np.ndarray
    examples: int
    behaviour: str = ""
    rounds_misbehaving: set[int] | None = field(default_factory=lambda: {1})
    busy_seconds: float = 0.0

    def misbehaves(self, config: dict) -> bool:
        if not self.behaviour:
            return False
        plan = json.loads(str(config.get(protocol.SECAGG_PLAN, "{}")))
        return self.rounds_misbehaving is None or plan.get("round") in self.rounds_misbehaving

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return []

    def get_properties(self, config: dict) -> dict:
        started = time.perf_counter()
        answer = self.participant.answer(config)
        self.busy_seconds += time.perf_counter() - started
        if config[protocol.SECAGG_STAGE] == protocol.ADVERTISE and self.misbehaves(config):
            if self.behaviour == "zero-key":  # 32 bytes that agree on nothing
                answer[protocol.SECAGG_KEYS] = sa.Advertised(bytes(32), bytes(32)).to_bytes()
            elif self.behaviour == "nested-keys":  # JSON deep enough to exhaust a parser's recursion
                answer[protocol.SECAGG_KEYS] = b"[" * 100_000
        if (
            self.behaviour == "wrong-share"
            and config[protocol.SECAGG_STAGE] == protocol.UNMASK
            and self.misbehaves(config)
        ):
            shares = sa.unpack(answer[protocol.SECAGG_SHARES], "shares", sa.SHARE_BYTES)
            own = int(config[protocol.SECAGG_ID])
            other = next(v for v in sorted(shares) if v != own)
            shares[other] = shares[other][:4] + bytes(48)  # its index kept, its content wrong
            answer[protocol.SECAGG_SHARES] = sa.pack(shares)
        return answer

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        if protocol.SECAGG_STAGE not in config:  # a plain round: the update as it is
            return [(p + self.delta.astype(np.float32)) for p in parameters], self.examples, {}
        if self.behaviour == "drop-at-input" and self.misbehaves(config):
            raise wiring.AnswerFailed("this client went away")
        if self.behaviour == "malformed-input" and self.misbehaves(config):
            return [np.zeros(3, dtype=np.uint32)], 0, {}
        started = time.perf_counter()
        secrets = self.participant.prepare_input(config)
        masked = self.participant.masked_input(secrets, self.delta, self.examples, SEED)
        self.busy_seconds += time.perf_counter() - started
        return [masked], 0, {}


class Recording(Traffic):
    """The server's own byte counter, keeping every message it receives when `keep`."""

    def __init__(self, keep: bool = True) -> None:
        super().__init__()
        self.keep = keep
        self.messages: list[ClientMessage] = []

    def deserialize(self, data: bytes):
        message = super().deserialize(data)
        if self.keep and isinstance(message, ClientMessage):
            self.messages.append(message)
        return message


def scripted(
    settings: Settings,
    behaviours: list[str],
    identities: list[Identity | None] | None = None,
    size: int = MODEL_SIZE,
    rounds_misbehaving: set[int] | None = frozenset({1}),  # type: ignore[assignment]
) -> list[ScriptedClient]:
    identities = identities or [None] * len(behaviours)
    return [
        ScriptedClient(
            Participant(settings, identity, f"site-{i}"),
            true_update(i, size),
            100 + (37 * i) % 900,  # within MAX_WEIGHT: the plain rounds refuse none
            behaviour,
            None if rounds_misbehaving is None else set(rounds_misbehaving),
        )
        for i, (behaviour, identity) in enumerate(zip(behaviours, identities))
    ]


@contextmanager
def in_process(clients: list[ScriptedClient], keep: bool = True) -> Iterator[tuple[BoundedClientManager, Recording]]:
    """The real gRPC server and client wiring, all in this process; every client connected."""
    manager, traffic = BoundedClientManager(wait_timeout=30, seed=1), Recording(keep)
    address = f"127.0.0.1:{free_port()}"
    server = start_grpc_server(manager, Admission(len(clients) + 8), traffic, address, 256 << 20)
    threads = [
        threading.Thread(
            target=wiring.run,
            args=(client.to_client(), wiring.Endpoint(address, f"site-{i}", 256 << 20, 30)),
            name=f"client-{i}",
            daemon=True,
        )
        for i, client in enumerate(clients)
    ]
    for thread in threads:
        thread.start()
    try:
        if not manager.wait_for(len(clients), timeout=60):
            raise RuntimeError(f"only {manager.num_available()} of {len(clients)} in-process clients connected")
        yield manager, traffic
    finally:
        Server(client_manager=manager).disconnect_all_clients(timeout=10)
        for thread in threads:
            thread.join(timeout=20)
        server.stop(0)


def instructions(manager: BoundedClientManager, size: int) -> list[tuple[Any, FitIns]]:
    parameters = ndarrays_to_parameters([np.zeros(size, dtype=np.float32)])
    return [(p, FitIns(parameters, {})) for p in sorted(manager.all().values(), key=lambda p: p.cid)]


def plain_fit(item: tuple[Any, FitIns], server_round: int) -> tuple[Any, FitRes]:
    return item[0], item[0].fit(item[1], 600, server_round)


def bench_settings(clients: int, neighbours: int) -> Settings:
    return Settings(
        secure_aggregation=True, min_fit_clients=3, min_available_clients=3, max_clients=max(clients, 10),
        max_client_examples=MAX_WEIGHT, secagg_neighbours=neighbours, secagg_stage_timeout=300, round_timeout=600,
        update_norm_median_multiple=0,
    )  # fmt: skip


def cost_row(clients: int, dropout: float, neighbours: int, rounds: int) -> dict[str, Any]:
    settings = bench_settings(clients, neighbours)
    dropping = round(dropout * clients)
    behaviours = ["drop-at-input"] * dropping + [""] * (clients - dropping)
    group = scripted(settings, behaviours, rounds_misbehaving=None)
    secure_walls, plain_walls, unmask, secure_bytes, plain_bytes, ok = [], [], [], [], [], True
    with in_process(group, keep=False) as (manager, traffic):
        aggregator = SecureAggregator(settings, manager, MODEL_SIZE)
        # every plain update aggregated (the scripted ones are far from the all-zero model)
        plain_settings = settings.model_copy(update={"secure_aggregation": False, "update_norm_limit": 1e9})
        initial = ndarrays_to_parameters([np.zeros(MODEL_SIZE, dtype=np.float32)])
        strategy = build_strategy(plain_settings, initial)
        for r in range(1, rounds + 1):
            work = instructions(manager, MODEL_SIZE)
            traffic.take()
            started = time.perf_counter()
            outcome = aggregator.fit(r, work)
            secure_walls.append(time.perf_counter() - started)
            secure_bytes.append(traffic.take())
            unmask.append(outcome.unmask_seconds)
            ok = ok and outcome.failed is None and len(outcome.results) == clients - dropping
            # the plain round of the same clients: their updates in the clear, the guard, FedAvg
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=clients) as pool:
                answers = list(pool.map(functools.partial(plain_fit, server_round=r), work))
            kept = [(p, res) for p, res in answers if res.status.code == Code.OK][: clients - dropping]
            strategy.aggregate(r, kept, [])
            plain_walls.append(time.perf_counter() - started)
            plain_bytes.append(traffic.take())
    busy = [c.busy_seconds / rounds for c in group if not c.behaviour]
    secure_wall, plain_wall = statistics.median(secure_walls), statistics.median(plain_walls)
    return {
        "clients": clients,
        "dropout": dropout,
        "neighbours": neighbours or clients - 1,
        "protocol": "SecAgg" if neighbours == 0 or neighbours >= clients - 1 else "SecAgg+",
        "ok": ok,
        "secure_round_s": secure_wall,
        "plain_round_s": plain_wall,
        "ratio": secure_wall / plain_wall,
        "server_unmask_s": statistics.median(unmask),
        "client_protocol_s": statistics.median(busy) if busy else None,
        "secure_mb_received_per_client": statistics.median(b[1] for b in secure_bytes) / clients / 2**20,
        "secure_mb_sent_per_client": statistics.median(b[0] for b in secure_bytes) / clients / 2**20,
        "plain_mb_received_per_client": statistics.median(b[1] for b in plain_bytes) / clients / 2**20,
        "plain_mb_sent_per_client": statistics.median(b[0] for b in plain_bytes) / clients / 2**20,
    }


def accuracy_rows(workdir: Path, seeds: list[int], rounds: int, epochs: int, clients: int = 3) -> list[dict[str, Any]]:
    data = workdir / "data"
    prepare(data, NUM_SHARDS=clients)
    rows = []
    for seed in seeds:
        row: dict[str, Any] = {"seed": seed}
        for name, secure in (("plain", "false"), ("secure", "true")):
            run = run_federation(
                workdir / f"{name}-{seed}",
                clients,
                {"DATA_DIR": data, "NUM_SHARDS": clients, "SEED": seed, "NUM_ROUNDS": rounds, "LOCAL_EPOCHS": epochs,
                 "MIN_FIT_CLIENTS": clients, "MIN_EVALUATE_CLIENTS": clients, "SECURE_AGGREGATION": secure},
                warm=True,
            )  # fmt: skip
            final = run.history[-1] if run.ok and run.history else {}
            row[name] = final.get("eval_accuracy")
        rows.append(row)
    return rows


def measure(
    workdir: Path,
    clients: list[int],
    dropouts: list[float],
    rounds: int,
    seeds: list[int],
    accuracy_rounds: int,
    accuracy_epochs: int,
) -> dict[str, Any]:
    cost = []
    for n in clients:
        for neighbours in [0, *(k for k in SECAGG_PLUS_NEIGHBOURS if n - 1 > k)]:
            for dropout in dropouts:
                log.info(
                    "bench: secure aggregation, %d clients, %d neighbours, %.0f %% drop", n, neighbours, dropout * 100
                )
                cost.append(cost_row(n, dropout, neighbours, rounds))
    return {"cost": cost, "accuracy": accuracy_rows(workdir, seeds, accuracy_rounds, accuracy_epochs)}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    pairs = [r for r in results["accuracy"] if r["plain"] is not None and r["secure"] is not None]
    if not pairs:
        return []
    gaps = [(r["secure"] - r["plain"]) * 100 for r in pairs]
    worst = max(gaps, key=abs)
    return [
        {
            "target": "secure aggregation's final accuracy within 0.5 points of plain FedAvg, same seeds (paired)",
            "measured": f"gaps {', '.join(f'{g:+.2f}' for g in gaps)} points (worst {worst:+.2f}), {len(pairs)} seeds",
            "met": all(abs(g) <= 0.5 for g in gaps),
        }
    ]


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "## Secure aggregation: the protocol's cost, and accuracy against plain FedAvg",
        "",
        "The protocol alone: the real gRPC server and client wiring in one process, real participants, inputs of",
        f"the built-in CNN's size ({MODEL_SIZE:,} values); a plain round of the same clients beside each secure one.",
        "Clients and server share one interpreter here: the round's wall time is of the whole federation on one",
        "machine; `unmask` is the server's own share; `client` is one client's protocol work per round. Dropouts",
        "leave after key sharing (their masks are unmasked from their neighbours' shares). Medians over rounds.",
        "`sum right` NO: the round failed as the protocol says it must, since some client's neighbourhood kept",
        "fewer survivors than the threshold (SECAGG_THRESHOLD 0.6 of it) needed to rebuild its secrets.",
        "",
        "| clients | protocol | neighbours | dropout | secure round | plain round | ratio | unmask | client "
        "| MB in / out per client, secure | plain | sum right |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["cost"]:
        unmask = f"{r['server_unmask_s']:.3f} s" if r["ok"] else "failed"
        lines.append(
            f"| {r['clients']} | {r['protocol']} | {r['neighbours']} | {r['dropout'] * 100:.0f} % "
            f"| {r['secure_round_s']:.3f} s | {r['plain_round_s']:.3f} s | {r['ratio']:.1f} x "
            f"| {unmask} | {r['client_protocol_s'] or 0:.3f} s "
            f"| {r['secure_mb_received_per_client']:.3f} / {r['secure_mb_sent_per_client']:.3f} "
            f"| {r['plain_mb_received_per_client']:.3f} / {r['plain_mb_sent_per_client']:.3f} "
            f"| {'yes' if r['ok'] else 'NO'} |"
        )
    rows = results["accuracy"]
    plain = [r["plain"] for r in rows if r["plain"] is not None]
    secure = [r["secure"] for r in rows if r["secure"] is not None]
    lines += [
        "",
        "Final accuracy, digits, 3 sites IID, FedAvg, the same seeds with and without secure aggregation:",
        "",
        "| seed | plain | secure | secure - plain |",
        "|---|---|---|---|",
    ]
    for r in rows:
        gap = "n/a" if r["plain"] is None or r["secure"] is None else f"{(r['secure'] - r['plain']) * 100:+.2f} points"
        shown = {k: "n/a" if r[k] is None else f"{r[k] * 100:.2f} %" for k in ("plain", "secure")}
        lines.append(f"| {r['seed']} | {shown['plain']} | {shown['secure']} | {gap} |")
    if plain and secure:
        paired = [(r["secure"] - r["plain"]) * 100 for r in rows if r["plain"] is not None and r["secure"] is not None]
        lines += [
            "",
            f"Mean: plain {mean_sd_text(plain, 2, 100)} %, secure {mean_sd_text(secure, 2, 100)} %; "
            f"paired difference {mean_sd_text(paired, 2)} points (one test image of 360 is 0.28 points).",
        ]
    return "\n".join(lines) + "\n"
