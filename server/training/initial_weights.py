"""The starting weights of a run: never from one unverified client.

Either pinned (INITIAL_MODEL, a .npz model file such as a finished run's final_model.npz), or
agreed by the first clients: Flowerpot clients build the same seeded model, so honest clients
send byte-identical weights, and a client that sends anything else is outvoted, named and no
longer used. With a single client (MIN_AVAILABLE_CLIENTS=1) there is no one to agree with: its
weights are taken with a warning that points at INITIAL_MODEL.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from flwr.common import Code, GetParametersIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from server.training.strategies import client_label
from shared.errors import BadInput, ClientsTimeout
from shared.modelfile import load_model, task_of
from shared.settings import BUILTIN_TASK

log = logging.getLogger("flowerpot.server")


class NoAnswers(ClientsTimeout):
    """No client asked sent usable weights (they left, or their messages were too large)."""


def load_pinned(path: Path, task: str = BUILTIN_TASK) -> Parameters:
    """INITIAL_MODEL's arrays; BadInput (at start, before any client joins) when unusable, or a
    model of another task than TASK."""
    if not path.is_file():
        raise BadInput(f"INITIAL_MODEL={path} is not a file: point it at a model .npz such as a run's final_model.npz")
    try:
        arrays, meta = load_model(path)
    except BadInput as exc:
        raise BadInput(f"INITIAL_MODEL={path}: {exc}") from None
    if task_of(meta) != task:
        raise BadInput(
            f"INITIAL_MODEL={path} is a model of TASK={task_of(meta)}, the run's TASK={task}: make it with "
            f"`flowerpot init-model` under TASK={task}, or empty INITIAL_MODEL"
        )
    if not arrays or not all(np.issubdtype(a.dtype, np.number) and np.isfinite(a).all() for a in arrays):
        raise BadInput(
            f"INITIAL_MODEL={path} holds no arrays, or non-numeric or non-finite ones: "
            "point it at a model .npz such as a finished run's final_model.npz"
        )
    return ndarrays_to_parameters(arrays)


def checksum(parameters: Parameters) -> str:
    digest = hashlib.sha256()
    for tensor in parameters.tensors:
        digest.update(len(tensor).to_bytes(8, "little"))
        digest.update(tensor)
    return digest.hexdigest()


def agreed_parameters(client_manager: ClientManager, asked: int, timeout: float, max_message_mb: int) -> Parameters:
    """Ask `asked` connected clients at once for their weights; the weights a strict majority of
    them (at least 2) sent byte for byte win. Clients that sent others are refused (never
    sampled again) and logged by name. ClientsTimeout when there is no majority."""
    proxies = list(client_manager.all().values())[: max(asked, 1)]
    if not proxies:
        raise NoAnswers("no client was connected to send initial parameters: check the clients' logs")
    with ThreadPoolExecutor(max_workers=len(proxies)) as pool:
        answers = list(pool.map(lambda proxy: _ask(proxy, timeout, max_message_mb), proxies))
    votes: dict[str, list[tuple[ClientProxy, Parameters]]] = defaultdict(list)
    for proxy, parameters in zip(proxies, answers):
        if parameters is not None:
            votes[checksum(parameters)].append((proxy, parameters))
    if not votes:
        raise NoAnswers(
            f"none of the {len(proxies)} clients asked sent usable initial parameters: check the clients' logs"
        )
    winner, group = max(votes.items(), key=lambda item: len(item[1]))
    answered = sum(len(g) for g in votes.values())
    if len(proxies) == 1:
        log.warning(
            "initial parameters from the only client %s, unverified: set INITIAL_MODEL to pin them",
            client_label(group[0][0]),
        )
        return group[0][1]
    if len(group) < 2 or 2 * len(group) <= answered:
        raise ClientsTimeout(
            f"the first {answered} clients disagree on the initial parameters (no majority): "
            "start clients with the same DATASET and SEED, or set INITIAL_MODEL to a model file"
        )
    for digest, others in votes.items():
        for proxy, _ in others if digest != winner else []:
            reason = (
                f"its initial parameters differ from those of {len(group)} other clients: start it with the "
                "same DATASET and SEED as the others (or the server's INITIAL_MODEL)"
            )
            log.warning("refused client %s: %s", client_label(proxy), reason)
            client_manager.unregister(proxy)  # never sampled, also before its stream has ended
            if hasattr(proxy, "refuse"):
                proxy.refuse(reason)
    arrays = parameters_to_ndarrays(group[0][1])
    log.info(
        "initial parameters agreed by %d clients (%s): %d arrays, %d values",
        len(group), ", ".join(client_label(p) for p, _ in group), len(arrays), sum(a.size for a in arrays),
    )  # fmt: skip
    return group[0][1]


def _ask(proxy: ClientProxy, timeout: float, max_message_mb: int) -> Parameters | None:
    try:
        res = proxy.get_parameters(GetParametersIns(config={}), timeout=timeout, group_id=0)
        arrays = parameters_to_ndarrays(res.parameters) if res.status.code == Code.OK else []
    except Exception as exc:  # the client left, or sent what is not a model: it does not vote
        reason = f"{exc.__class__.__name__}: it left, or its message was larger than MAX_MESSAGE_MB"
        log.warning("client %s gave no initial parameters (%s=%d allows)", client_label(proxy), reason, max_message_mb)
        return None
    if not arrays or not all(np.issubdtype(a.dtype, np.number) and np.isfinite(a).all() for a in arrays):
        log.warning("client %s sent unusable initial parameters", client_label(proxy))
        return None
    return res.parameters
