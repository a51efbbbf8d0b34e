"""A secure round's fit phase (SECURE_AGGREGATION): SecAgg+'s four stages over the sampled
clients' streams, and the one thing the server learns from them, the sum of the updates.

1. advertise: each client sends two public keys (signed with its client certificate);
2. share keys: each gets its neighbours' keys as they were signed, and sends its secrets' shares
   sealed for each neighbour, which the server cannot open;
3. masked input: each gets the shares sealed for it, trains, and sends its update quantized and
   masked (self mask, pairwise masks with each neighbour that shared keys);
4. unmask: each survivor sends its shares of the survivors' self-mask seeds and of the dropouts'
   mask keys; with enough of them the masks cancel and the sum remains.

A client that misses a stage (no answer within its timeout, a broken stream, a malformed or
refused message) is a dropout of that stage, said in one line; the round fails, as a failed
round (the model stays), when fewer than a neighbourhood's threshold are left or a mask cannot
be removed. The server never holds an individual update: only masked inputs and the sum.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.common import Code, FitIns, FitRes, GetPropertiesIns, Scalar
from flwr.server.client_proxy import ClientProxy

from server.training.update_checks import example_limit
from server.transport.admission import BoundedClientManager
from shared import protocol
from shared import secure_aggregation as sa
from shared.modelfile import npy_view
from shared.secure_aggregation import Advertised, Plan, ProtocolProblem
from shared.settings import Settings

log = logging.getLogger("flowerpot.server")

T = TypeVar("T")
SHOWN_DROPOUTS = 10  # named in a round's line; the rest counted (all of them in the history's failures)


class Dropout(RuntimeError):
    """A client that left a secure round at a stage, and why."""

    def __init__(self, proxy: ClientProxy, line: str) -> None:
        super().__init__(line)
        self.proxy = proxy


@dataclass
class SecureFit:
    """What a secure round's fit phase found."""

    plan: Plan
    delta: np.ndarray | None = None  # the example-weighted mean update, flat; None: the round failed
    weight: float = 0.0  # the sum of the survivors' weights (examples / max_weight, each at most 1)
    results: list[tuple[ClientProxy, FitRes]] = field(default_factory=list)  # the survivors' (masked) answers
    failures: list[Any] = field(default_factory=list)  # one Dropout per client that left
    failed: str | None = None
    error_bound: float = 0.0  # per coordinate, between `delta` and the mean of the clipped updates
    unmask_seconds: float = 0.0  # the server's own work: rebuilding the secrets, removing the masks


def max_weight(settings: Settings) -> int:
    """The example count at which a client's weight is 1, announced in every plan: MAX_CLIENT_EXAMPLES,
    else twice an even shard of the data set (a larger shard is counted as that many)."""
    if settings.max_client_examples:
        return settings.max_client_examples
    return max(1, math.ceil(2 * example_limit(settings) / settings.num_shards))


def usable_keys(blob: Any) -> None:
    """Advertised keys that parse and agree (an all-zero X25519 key agrees nothing): else the
    client's neighbours would fail on it."""
    entry = Advertised.from_bytes(blob)
    trial = sa.new_key()
    sa.agree(trial, entry.c_public, b"check", 0)
    sa.agree(trial, entry.s_public, b"check", 0)


def seed_matches(round_: int, client: int, commitment: bytes, seed: bytes) -> bool:
    return sa.commitment(seed, round_, client) == commitment


def key_matches(public: bytes, raw: bytes) -> bool:
    return len(raw) == sa.KEY_BYTES and sa.public_bytes(sa.private_key(raw)) == public


class SecureAggregator:
    def __init__(self, settings: Settings, client_manager: BoundedClientManager, size: int) -> None:
        self.settings, self.client_manager, self.size = settings, client_manager, size
        self.max_weight = max_weight(settings)

    def plan(self, server_round: int, sampled: int) -> Plan:
        s = self.settings
        return Plan(
            round=server_round,
            sampled=sampled,
            neighbours=s.secagg_neighbours,
            threshold=s.secagg_threshold,
            clip_range=s.secagg_clip_range,
            bits=s.secagg_quantization_bits,
            max_weight=self.max_weight,
        )

    def fit(self, server_round: int, instructions: list[tuple[ClientProxy, FitIns]]) -> SecureFit:
        # The clients' numbers, and so who neighbours whom on the ring, from a secure shuffle each
        # round (SecAgg+'s random graph): no client can arrange to neighbour a chosen one.
        instructions = list(instructions)
        random.SystemRandom().shuffle(instructions)
        plan = self.plan(server_round, len(instructions))
        outcome = SecureFit(plan)
        proxies = {i + 1: proxy for i, (proxy, _) in enumerate(instructions)}
        fit_ins = {i + 1: ins for i, (_, ins) in enumerate(instructions)}
        if plan.unsafe() is not None:  # fewer than 3 sampled: no sum hides anyone
            return self.fail(outcome, f"{len(instructions)} clients were sampled, secure aggregation needs 3 or more")
        base: dict[str, Scalar] = {protocol.SECAGG_PLAN: plan.to_json()}

        def stage(name: str, **values: Scalar) -> Callable[[int], dict[str, Scalar]]:
            return lambda u: {**base, protocol.SECAGG_STAGE: name, protocol.SECAGG_ID: u, **values}

        # 1. advertise
        answers = self.properties(outcome, proxies, set(proxies), stage(protocol.ADVERTISE), protocol.ADVERTISE)
        keys: dict[int, bytes] = {}
        for u, props in answers.items():
            blob = props.get(protocol.SECAGG_KEYS)
            if self.checked(outcome, proxies[u], protocol.ADVERTISE, functools.partial(usable_keys, blob)):
                assert isinstance(blob, bytes)  # from_bytes took it
                keys[u] = blob  # relayed as sent
        if len(keys) < plan.survivors_needed:
            return self.fail(outcome, f"only {len(keys)} clients advertised keys, {plan.survivors_needed} are needed")

        # 2. share keys: each gets its neighbourhood's keys
        neighbourhood = {u: ({u} | set(plan.neighbours_of(u))) & set(keys) for u in keys}
        for u in [u for u in keys if len(neighbourhood[u]) < plan.shares_needed]:
            self.drop(outcome, proxies[u], protocol.SHARE_KEYS, "too few of its neighbours advertised keys")
            del keys[u]

        def share_config(u: int) -> dict[str, Scalar]:
            peers = sa.pack({v: keys[v] for v in sorted(neighbourhood[u] & set(keys))})
            return stage(protocol.SHARE_KEYS, **{protocol.SECAGG_PEERS: peers})(u)

        answers = self.properties(outcome, proxies, set(keys), share_config, protocol.SHARE_KEYS)
        sealed: dict[int, dict[int, bytes]] = {}  # sender: {receiver: sealed share}
        commitments: dict[int, bytes] = {}
        for u, props in answers.items():
            expected = (neighbourhood[u] & set(keys)) - {u}

            def read(u: int = u, props: dict = props, expected: set[int] = expected) -> None:
                out = sa.unpack(props.get(protocol.SECAGG_CIPHERTEXTS), "sealed shares", sa.MAX_CIPHERTEXT_BYTES)
                if set(out) != expected:
                    raise ProtocolProblem(
                        f"it sealed shares for {sorted(out)}, not for its neighbours {sorted(expected)}"
                    )
                commit = props.get(protocol.SECAGG_COMMITMENT)
                if not isinstance(commit, bytes) or len(commit) != 32:
                    raise ProtocolProblem("its seed commitment is not 32 bytes")
                sealed[u], commitments[u] = out, commit

            self.checked(outcome, proxies[u], protocol.SHARE_KEYS, read)
        shared = set(sealed)
        if len(shared) < plan.survivors_needed:
            return self.fail(
                outcome, f"only {len(shared)} clients shared their keys, {plan.survivors_needed} are needed"
            )

        # 3. masked input: each gets the shares sealed for it by the others that shared keys
        delivered = {u: {v: sealed[v][u] for v in shared if v != u and u in sealed[v]} for u in shared}

        def masked_config(u: int) -> FitIns:
            extra = stage(protocol.MASKED_INPUT, **{protocol.SECAGG_CIPHERTEXTS: sa.pack(delivered[u])})(u)
            return FitIns(fit_ins[u].parameters, {**fit_ins[u].config, **extra})

        limit = self.settings.round_deadline or self.settings.round_timeout
        fits = self.ask(
            outcome, proxies, shared, lambda u: proxies[u].fit(masked_config(u), limit, server_round),
            protocol.MASKED_INPUT, limit,
        )  # fmt: skip
        inputs: dict[int, np.ndarray] = {}
        for u, res in fits.items():

            def read_input(u: int = u, res: FitRes = res) -> None:
                if res.status.code != Code.OK:
                    raise ProtocolProblem(f"it failed: {res.status.message}")
                inputs[u] = self.masked_array(res, plan)
                outcome.results.append((proxies[u], res))

            self.checked(outcome, proxies[u], protocol.MASKED_INPUT, read_input)
        survivors = set(inputs)
        if len(survivors) < plan.survivors_needed:
            return self.fail(
                outcome, f"only {len(survivors)} clients sent a masked input, {plan.survivors_needed} are needed"
            )

        # 4. unmask
        dropped = shared - survivors

        def unmask_config(u: int) -> dict[str, Scalar]:
            return stage(
                protocol.UNMASK,
                **{
                    protocol.SECAGG_SURVIVORS: json.dumps(sorted(survivors)).encode(),
                    protocol.SECAGG_DROPPED: json.dumps(sorted(dropped & set(delivered[u]))).encode(),
                },
            )(u)

        answers = self.properties(outcome, proxies, survivors, unmask_config, protocol.UNMASK, late_is_dropout=False)
        revealed: dict[int, dict[int, bytes]] = {}  # holder: {owner: share}
        for w, props in answers.items():
            allowed = ({w} | set(delivered[w])) & (survivors | dropped)

            def read_shares(w: int = w, props: dict = props, allowed: set[int] = allowed) -> None:
                shares = sa.unpack(props.get(protocol.SECAGG_SHARES), "shares", sa.SHARE_BYTES)
                if not set(shares) <= allowed or any(len(v) != sa.SHARE_BYTES for v in shares.values()):
                    raise ProtocolProblem("its shares are not of its neighbours, or not of a share's length")
                revealed[w] = shares

            self.checked(outcome, proxies[w], protocol.UNMASK, read_shares, leaves=False)
        started = time.perf_counter()
        try:
            total = self.unmasked_sum(plan, inputs, revealed, keys, commitments, dropped, delivered, proxies)
        except ProtocolProblem as problem:
            return self.fail(outcome, str(problem))
        outcome.unmask_seconds = time.perf_counter() - started
        delta, weight = sa.decode_sum(total, len(survivors), plan)
        bound = sa.error_bound(len(survivors), weight, plan) if weight > 0 else math.inf
        # The sum of clipped, weighted updates: finite, a weight of at most 1 each, and a mean no
        # coordinate of which is beyond the clip range. A wrong share or mask breaks all three.
        if not (0 < weight <= len(survivors) * (1 + 1e-6)) or not np.all(np.abs(delta) <= plan.clip_range + bound):
            return self.fail(outcome, "the unmasked sum is not one of clipped updates (a share or a mask was wrong)")
        outcome.delta, outcome.weight, outcome.error_bound = delta, weight, bound
        self.summary(outcome, len(instructions), len(keys), len(shared))
        return outcome

    def unmasked_sum(
        self,
        plan: Plan,
        inputs: dict[int, np.ndarray],
        revealed: dict[int, dict[int, bytes]],
        keys: dict[int, bytes],
        commitments: dict[int, bytes],
        dropped: set[int],
        delivered: dict[int, dict[int, bytes]],
        proxies: dict[int, ClientProxy],
    ) -> np.ndarray:
        length, bits = self.size + 1, plan.modulus_bits
        total = np.zeros(length, dtype=np.uint64)
        for u in sorted(inputs):
            total += inputs[u].astype(np.uint64)
        for u in sorted(inputs):
            committed = functools.partial(seed_matches, plan.round, u, commitments[u])
            seed = self.rebuild(plan, u, revealed, committed, "self-mask seed", proxies)
            total -= sa.mask(seed, b"self", plan.round, length, bits)
        for v in sorted(dropped):
            s_public = Advertised.from_bytes(keys[v]).s_public
            raw = self.rebuild(plan, v, revealed, functools.partial(key_matches, s_public), "mask key", proxies)
            key = sa.private_key(raw)
            for u in sorted(inputs):
                if v not in delivered[u]:
                    continue  # u did not mask with v
                seed = sa.agree(key, Advertised.from_bytes(keys[u]).s_public, b"pair", plan.round)
                pairwise = sa.mask(seed, b"pair", plan.round, length, bits)
                total = total - pairwise if v > u else total + pairwise  # what u added, taken away
        return total & np.uint64((1 << bits) - 1)

    def rebuild(
        self,
        plan: Plan,
        owner: int,
        revealed: dict[int, dict[int, bytes]],
        correct: Callable[[bytes], bool],
        what: str,
        proxies: dict[int, ClientProxy],
    ) -> bytes:
        """`owner`'s secret from the shares revealed of it, checked (a seed against its commitment,
        a mask key against its public key); a wrong share is found by leaving one out at a time."""
        held = {w: shares[owner] for w, shares in revealed.items() if owner in shares}
        if len(held) < plan.shares_needed:
            raise ProtocolProblem(
                f"client {self.label(proxies[owner])}'s {what} cannot be rebuilt: {len(held)} shares revealed, "
                f"{plan.shares_needed} needed"
            )
        candidates = [sorted(held)] + (
            [[w for w in sorted(held) if w != bad] for bad in sorted(held)] if len(held) > plan.shares_needed else []
        )
        for holders in candidates:
            try:
                secret = sa.rebuild([held[w] for w in holders])
            except ProtocolProblem:
                continue
            if correct(secret):
                for bad in set(held) - set(holders):
                    log.warning(
                        "round %d: client %s revealed a wrong share of client %s's %s: it was left out",
                        plan.round, self.label(proxies[bad]), self.label(proxies[owner]), what,
                    )  # fmt: skip
                return secret
        raise ProtocolProblem(f"client {self.label(proxies[owner])}'s {what} cannot be rebuilt: its shares disagree")

    def masked_array(self, res: FitRes, plan: Plan) -> np.ndarray:
        if len(res.parameters.tensors) != 1:
            raise ProtocolProblem(f"its masked input has {len(res.parameters.tensors)} arrays, not 1")
        try:
            array = npy_view(res.parameters.tensors[0])
        except ValueError as exc:
            raise ProtocolProblem(f"its masked input is not an array ({exc})") from None
        if array.dtype != plan.dtype or array.shape != (self.size + 1,):
            raise ProtocolProblem(
                f"its masked input is {array.dtype} of shape {array.shape}, not {plan.dtype} of ({self.size + 1},)"
            )
        if plan.modulus_bits < 64 and int(array.max(initial=0)) >= 1 << plan.modulus_bits:
            raise ProtocolProblem("its masked input holds values outside the field")
        return array

    # --- stages --------------------------------------------------------------------------------

    def properties(
        self,
        outcome: SecureFit,
        proxies: dict[int, ClientProxy],
        clients: set[int],
        config: Callable[[int], dict[str, Scalar]],
        name: str,
        late_is_dropout: bool = True,
    ) -> dict[int, dict[str, Scalar]]:
        timeout = self.settings.secagg_stage_timeout

        def call(u: int) -> Any:
            return proxies[u].get_properties(GetPropertiesIns(config(u)), timeout, outcome.plan.round)

        answers = self.ask(outcome, proxies, clients, call, name, timeout, leaves=late_is_dropout)
        found: dict[int, dict[str, Scalar]] = {}
        for u, res in answers.items():
            props = dict(res.properties)
            if res.status.code != Code.OK or protocol.SECAGG_PROBLEM in props:
                self.drop(
                    outcome,
                    proxies[u],
                    name,
                    f"it refused: {props.get(protocol.SECAGG_PROBLEM, res.status.message)}",
                    late_is_dropout,
                )
            else:
                found[u] = props
        return found

    def ask(
        self,
        outcome: SecureFit,
        proxies: dict[int, ClientProxy],
        clients: set[int],
        call: Callable[[int], T],
        name: str,
        timeout: float,
        leaves: bool = True,
    ) -> dict[int, T]:
        """`call` for each client at once, waited for at most `timeout`: the answers; every client
        that gave none is a dropout of the stage. A client still busy is held from later rounds
        until its late answer (dropped) arrives."""
        if not clients:
            return {}
        pool = ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix=f"secagg-{outcome.plan.round}")
        pending: dict[Future, int] = {pool.submit(call, u): u for u in sorted(clients)}
        pool.shutdown(wait=False)
        done, late = wait(list(pending), timeout=timeout + 1)  # the proxies' own timeouts end first
        answers: dict[int, T] = {}
        for future in done:
            u = pending[future]
            if future.exception() is not None:
                self.drop(
                    outcome, proxies[u], name, f"{type(future.exception()).__name__}: {future.exception()}", leaves
                )
            else:
                answers[u] = future.result()
        for future in late:
            u = pending[future]
            self.client_manager.hold_until(proxies[u].cid, future)
            self.drop(outcome, proxies[u], name, f"no answer within {timeout:g} s", leaves)
        return answers

    def checked(
        self, outcome: SecureFit, proxy: ClientProxy, name: str, read: Callable[[], Any], leaves: bool = True
    ) -> bool:
        """Whether `read` took the client's answer; a malformed one drops the client, in one line."""
        try:
            read()
        except ProtocolProblem as problem:
            self.drop(outcome, proxy, name, str(problem), leaves)
            return False
        return True

    def drop(self, outcome: SecureFit, proxy: ClientProxy, name: str, why: str, leaves: bool = True) -> None:
        """A client out of the stage, in one line. At UNMASK a client's input is in the sum already:
        it is not a dropout then, only its shares are missing."""
        line = f"{self.label(proxy)} left at {name}: {why}"
        log.warning("round %d: secure aggregation: %s", outcome.plan.round, line)
        if leaves:
            outcome.failures.append(Dropout(proxy, line))

    @staticmethod
    def label(proxy: ClientProxy) -> str:
        from server.training.strategies import client_label  # strategies imports this module

        return client_label(proxy)

    def fail(self, outcome: SecureFit, why: str) -> SecureFit:
        outcome.failed = f"secure aggregation failed: {why}"
        return outcome

    def summary(self, outcome: SecureFit, sampled: int, advertised: int, shared: int) -> None:
        names = [self.label(f.proxy) for f in outcome.failures]
        shown = ", ".join(names[:SHOWN_DROPOUTS]) + (
            f" and {len(names) - SHOWN_DROPOUTS} more" if len(names) > SHOWN_DROPOUTS else ""
        )
        log.info(
            "round %d: secure aggregation of %d sampled: %d advertised keys, %d shared them, %d sent inputs; "
            "the sum unmasked (weight %.3f, within %.2g per coordinate of the clipped mean)%s",
            outcome.plan.round, sampled, advertised, shared, len(outcome.results), outcome.weight,
            outcome.error_bound, f"; dropouts: {shown}" if names else "",
        )  # fmt: skip
