"""The starting weights of a run: never from one unverified client.

Either pinned (INITIAL_MODEL, a .npz model file such as a finished run's final_model.npz), or
agreed by the first clients: Flowerpot clients build the same seeded model, so honest clients
send byte-identical weights, and a client that sends anything else is outvoted, named and no
longer used. Each participant (a client certificate, else a site) has one vote however many
connections it holds, so one certificate with many streams cannot outvote the others; a client
that does not answer within the bound is dropped and named, and the vote goes on without it.
With a single participant there is no one to agree with: its weights are taken with a warning
that points at INITIAL_MODEL.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from flwr.common import Code, GetParametersIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from server.reporting.site_report import named_list
from server.training.strategies import client_label, participant_of
from shared.errors import BadInput, ClientsTimeout
from shared.modelfile import load_model, task_of
from shared.protocol import BUILTIN_TASK

log = logging.getLogger("flowerpot.server")


# Sending the starting weights takes a client no training: one that has not answered within this
# (or ROUND_TIMEOUT, if shorter) never will, and loses its seat instead of holding up the run.
VOTE_SECONDS = 60.0
# Asked at once: each is a thread on top of the streams' own (two per client). Honest clients
# answer in milliseconds; a silent one holds its thread for the whole bound, so the vote waits
# another bound only for every MAX_ASKING silent clients.
MAX_ASKING = 1024


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
    """Ask every connected client for its weights (MAX_ASKING at once; the run waited
    for `asked`), within `timeout` or VOTE_SECONDS; every participant has one vote, whatever its
    number of connections: the weights most of its own connections sent. The weights a strict
    majority of the participants that answered sent byte for byte win; a lone participant's are
    taken with a warning. Clients that did not answer, and those that sent other weights, are
    dropped (never sampled again) and named, so an idle stream loses its seat here.
    ClientsTimeout when there is no majority."""
    timeout = min(timeout, VOTE_SECONDS)
    proxies = list(client_manager.all().values())
    if not proxies:
        raise NoAnswers("no client was connected to send initial parameters: check the clients' logs")
    # One copy of each distinct answer, not one per client: with a thousand clients sending the
    # same model, the vote holds one model, not a thousand.
    kept: dict[str, Parameters] = {}
    keeping = threading.Lock()

    def digest_of(proxy: ClientProxy) -> str | None:
        parameters = _ask(proxy, timeout, max_message_mb)
        if parameters is None:
            return None
        digest = checksum(parameters)
        with keeping:
            kept.setdefault(digest, parameters)
        return digest

    with ThreadPoolExecutor(max_workers=min(len(proxies), MAX_ASKING)) as pool:
        answers = list(pool.map(digest_of, proxies))
    silent = [proxy for proxy, digest in zip(proxies, answers) if digest is None]
    for proxy in silent:
        _drop(client_manager, proxy, f"it sent no usable initial parameters within {timeout:g} s")
    by_participant: dict[str, dict[str, list[ClientProxy]]] = defaultdict(lambda: defaultdict(list))
    for proxy, digest in zip(proxies, answers):
        if digest is not None:
            by_participant[participant_of(proxy)][digest].append(proxy)
    if not by_participant:
        raise NoAnswers(
            f"none of the {len(proxies)} clients asked sent usable initial parameters: check the clients' logs"
        )
    votes: dict[str, list[str]] = defaultdict(list)  # checksum -> the participants that sent it
    for who, sent in by_participant.items():
        votes[max(sent, key=lambda digest: len(sent[digest]))].append(who)
    winner, agreeing = max(votes.items(), key=lambda item: len(item[1]))
    if len(by_participant) > 1 and 2 * len(agreeing) <= len(by_participant):
        groups = "; ".join(", ".join(sorted(who)) for who in votes.values())
        raise ClientsTimeout(
            f"the {len(by_participant)} participants that answered disagree on the initial parameters, none by a "
            f"strict majority ({groups}): start clients with the same DATASET and SEED, or set INITIAL_MODEL to a "
            "model file"
        )
    group = [p for sent in by_participant.values() for p in sent.get(winner, [])]
    for sent in by_participant.values():
        for digest, others in sent.items():
            for proxy in others if digest != winner else []:
                _drop(
                    client_manager,
                    proxy,
                    f"its initial parameters differ from those of {len(agreeing)} agreeing participant(s) "
                    f"({', '.join(sorted(agreeing))}): start it with the same DATASET and SEED as the others (or the "
                    "server's INITIAL_MODEL)",
                )
    if len(group) == 1:
        log.warning(
            "initial parameters from the only client that answered, %s, unverified: set INITIAL_MODEL to pin them",
            client_label(group[0]),
        )
        return kept[winner]
    arrays = parameters_to_ndarrays(kept[winner])
    log.info(
        "initial parameters agreed by %d clients of %d participant(s) (%s): %d arrays, %d values",
        len(group), len(agreeing), named_list(sorted(agreeing)), len(arrays), sum(a.size for a in arrays),
    )  # fmt: skip
    if len(agreeing) == 1:
        log.warning(
            "initial parameters from a single participant (%s), unverified by any other: set INITIAL_MODEL to pin them",
            agreeing[0],
        )
    return kept[winner]


def _drop(client_manager: ClientManager, proxy: ClientProxy, reason: str) -> None:
    log.warning("refused client %s in the vote on the initial parameters: %s", client_label(proxy), reason)
    client_manager.unregister(proxy)  # never sampled, also before its stream has ended
    if hasattr(proxy, "refuse"):
        proxy.refuse(reason)


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
