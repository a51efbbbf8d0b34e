"""A client's side of secure aggregation (SECURE_AGGREGATION; shared/secure_aggregation.py has
the protocol's pieces, docs/secure-aggregation.md what it protects).

One `Participant` per logical client holds the secrets of one round at a time: two X25519 key
pairs, a self-mask seed, the shares it holds of its neighbours' secrets. Every stage checks what
the server relayed before acting on it, and a stage out of order or repeated is refused: in
particular a client reveals, for each neighbour, either its share of the self-mask seed (the
neighbour sent its input) or its share of the mask key (it did not), never both.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.common import Scalar

from shared import protocol
from shared import secure_aggregation as sa
from shared.secure_aggregation import Advertised, Plan, ProtocolProblem
from shared.settings import Settings

log = logging.getLogger("flowerpot.client")

# The largest relayed message a client reads: every neighbour's keys with a certificate each.
MAX_PEERS_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Identity:
    """The client certificate's key and certificate, and the CA that issued every peer's."""

    private_key: bytes
    certificate: bytes
    ca: bytes


@dataclass
class RoundSecrets:
    plan: Plan
    me: int
    c_key: X25519PrivateKey = field(default_factory=sa.new_key)  # seals the shares
    s_key: X25519PrivateKey = field(default_factory=sa.new_key)  # agrees the pairwise masks
    stage: str = protocol.ADVERTISE  # the last stage answered
    seed: bytes = b""
    peers: dict[int, Advertised] = field(default_factory=dict)  # the neighbourhood, itself included
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # owner: (seed share, key share)
    masked_with: set[int] = field(default_factory=set)  # the neighbours whose pairwise masks it adds
    pairwise: dict[int, bytes] = field(default_factory=dict)  # each one's agreed mask seed

    @property
    def advertised(self) -> tuple[bytes, bytes]:
        return sa.public_bytes(self.c_key), sa.public_bytes(self.s_key)


class Participant:
    def __init__(self, settings: Settings, identity: Identity | None, label: str) -> None:
        self.settings, self.identity, self.label = settings, identity, label
        self.secrets: RoundSecrets | None = None
        self.warned_unsigned = False

    def answer(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """A get_properties stage's answer; a refusal is an answer too, saying why, and this
        client leaves the round (the server counts it as a dropout)."""
        stage = config.get(protocol.SECAGG_STAGE)
        try:
            if stage == protocol.ADVERTISE:
                return self.advertise(config)
            if stage == protocol.SHARE_KEYS:
                return self.share_keys(config)
            if stage == protocol.UNMASK:
                return self.unmask(config)
            raise ProtocolProblem(f"there is no stage {stage!r}")
        except ProtocolProblem as problem:
            self.secrets = None  # nothing of this round is used again
            log.warning("%s: secure aggregation, %s: %s; this client leaves the round", self.label, stage, problem)
            return {protocol.SECAGG_PROBLEM: str(problem)}

    def plan_of(self, config: dict[str, Scalar]) -> tuple[Plan, int]:
        plan = Plan.from_json(config.get(protocol.SECAGG_PLAN))
        me = config.get(protocol.SECAGG_ID)
        if not isinstance(me, int) or not 1 <= me <= plan.sampled:
            raise ProtocolProblem(f"its number in the round, {me!r}, is not one of 1..{plan.sampled}")
        s = self.settings
        if s.secure_aggregation:  # its own settings are the floor a server cannot lower
            ours = (s.secagg_threshold, s.secagg_neighbours, s.secagg_clip_range, s.secagg_quantization_bits)
            theirs = (plan.threshold, plan.neighbours, plan.clip_range, plan.bits)
            if ours != theirs:
                raise ProtocolProblem(
                    "the server's SECAGG_THRESHOLD, SECAGG_NEIGHBOURS, SECAGG_CLIP_RANGE, SECAGG_QUANTIZATION_BITS "
                    f"are {theirs}, this client's {ours}: run both with the same .env"
                )
        return plan, me

    def current(self, config: dict[str, Scalar], after: str) -> RoundSecrets:
        """This round's secrets, when the stage before this one was `after`."""
        plan, me = self.plan_of(config)
        secrets = self.secrets
        if secrets is None or secrets.plan != plan or secrets.me != me or secrets.stage != after:
            raise ProtocolProblem(
                f"it comes out of order (this client's last stage of round {plan.round} was not {after})"
            )
        return secrets

    def advertise(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        plan, me = self.plan_of(config)
        self.secrets = secrets = RoundSecrets(plan, me)
        c_public, s_public = secrets.advertised
        entry = Advertised(c_public, s_public)
        if self.identity is not None:
            signature = sa.sign(self.identity.private_key, sa.keys_message(plan.round, me, c_public, s_public))
            entry = Advertised(c_public, s_public, signature, self.identity.certificate)
        return {protocol.SECAGG_KEYS: entry.to_bytes()}

    def share_keys(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        secrets = self.current(config, protocol.ADVERTISE)
        plan, me = secrets.plan, secrets.me
        raw = sa.unpack(config.get(protocol.SECAGG_PEERS), "neighbours' keys", MAX_PEERS_BYTES)
        peers = {v: Advertised.from_bytes(blob) for v, blob in raw.items()}
        if me not in peers or (peers[me].c_public, peers[me].s_public) != secrets.advertised:
            raise ProtocolProblem("the relayed keys do not hold this client's own keys as it advertised them")
        others = set(peers) - {me}
        if not others <= set(plan.neighbours_of(me)):
            raise ProtocolProblem(f"the relayed keys name clients that are not its neighbours: {sorted(others)}")
        if len(peers) < plan.shares_needed:
            raise ProtocolProblem(
                f"only {len(peers)} of its neighbourhood of {plan.group} advertised keys, "
                f"{plan.shares_needed} are needed to rebuild its secrets"
            )
        keys = [(e.c_public, e.s_public) for e in peers.values()]
        if len({k for pair in keys for k in pair}) != 2 * len(keys):
            raise ProtocolProblem("two clients advertised the same public key")
        self.check_signatures(plan, peers, me)
        secrets.peers, secrets.seed = peers, os.urandom(sa.KEY_BYTES)
        holders = sorted(peers)
        seed_shares = sa.split(secrets.seed, plan.shares_needed, len(holders))
        key_shares = sa.split(sa.private_bytes(secrets.s_key), plan.shares_needed, len(holders))
        sealed: dict[int, bytes] = {}
        for holder, seed_share, key_share in zip(holders, seed_shares, key_shares):
            if holder == me:
                secrets.held[me] = (seed_share, key_share)
                continue
            key = sa.agree(secrets.c_key, peers[holder].c_public, b"share", plan.round)
            sealed[holder] = sa.seal(
                key, sa.share_plaintext(me, holder, seed_share, key_share), sa.route(plan.round, me, holder)
            )
        secrets.stage = protocol.SHARE_KEYS
        return {
            protocol.SECAGG_CIPHERTEXTS: sa.pack(sealed),
            protocol.SECAGG_COMMITMENT: sa.commitment(secrets.seed, plan.round, me),
        }

    def check_signatures(self, plan: Plan, peers: dict[int, Advertised], me: int) -> None:
        """With a client certificate, every neighbour's keys must be signed by a certificate of
        this client's CA: a relaying server that swapped keys is caught here."""
        if self.identity is None:
            if not self.warned_unsigned:
                log.warning(
                    "%s: secure aggregation without CLIENT_AUTH=certificate: the clients' keys are not signed, "
                    "so a server that swaps them in relay could read updates (docs/secure-aggregation.md)",
                    self.label,
                )
                self.warned_unsigned = True
            return
        own = sa.certificate_id(self.identity.certificate)
        seen: dict[bytes, int] = {}
        # One certificate other than its own may vouch for at most MAX_CONNECTIONS_PER_CLIENT
        # neighbours (a site's replicas): else one colluding certificate could fill them all.
        bound = self.settings.max_connections_per_client or len(peers)
        for v, entry in sorted(peers.items()):
            if v == me:
                continue
            cert = sa.certificate_id(entry.certificate)
            seen[cert] = seen.get(cert, 0) + 1
            if cert != own and seen[cert] > bound:
                raise ProtocolProblem(
                    f"one certificate signs the keys of more than MAX_CONNECTIONS_PER_CLIENT={bound} of its neighbours"
                )
            if not entry.signature or not entry.certificate:
                raise ProtocolProblem(f"client {v}'s keys are not signed (every client needs CLIENT_AUTH=certificate)")
            problem = sa.signature_problem(
                entry.certificate, self.identity.ca, sa.keys_message(plan.round, v, entry.c_public, entry.s_public),
                entry.signature,
            )  # fmt: skip
            if problem is not None:
                raise ProtocolProblem(f"client {v}'s keys are refused: {problem}")

    def prepare_input(self, config: dict[str, Scalar]) -> RoundSecrets:
        """Before training: the shares its neighbours sealed for it, opened and kept."""
        secrets = self.current(config, protocol.SHARE_KEYS)
        plan, me = secrets.plan, secrets.me
        sealed = sa.unpack(config.get(protocol.SECAGG_CIPHERTEXTS), "sealed shares", sa.MAX_CIPHERTEXT_BYTES)
        if not set(sealed) <= set(secrets.peers) - {me}:
            raise ProtocolProblem("the sealed shares come from clients that are not its neighbours")
        if len(sealed) + 1 < plan.shares_needed:
            raise ProtocolProblem(
                f"only {len(sealed)} neighbours shared their keys, {plan.shares_needed - 1} are needed"
            )
        for v, blob in sorted(sealed.items()):
            # Its pairwise mask is added whether or not its share opens: the server paired the
            # two of them, and the other side adds it too. Agreed here, where a bad key refuses.
            secrets.pairwise[v] = sa.agree(secrets.s_key, secrets.peers[v].s_public, b"pair", plan.round)
            secrets.masked_with.add(v)
            try:
                key = sa.agree(secrets.c_key, secrets.peers[v].c_public, b"share", plan.round)
                secrets.held[v] = sa.share_parts(sa.unseal(key, blob, sa.route(plan.round, v, me)), v, me)
            except ProtocolProblem as problem:
                log.warning("%s: secure aggregation: client %d's share is dropped: %s", self.label, v, problem)
        return secrets

    def masked_input(self, secrets: RoundSecrets, delta: np.ndarray, examples: int, seed: int) -> np.ndarray:
        """The quantized, weighted update under its self mask and its pairwise masks; `seed`: the
        fit's, for the stochastic rounding (not secret: the masks hide the input)."""
        plan, me = secrets.plan, secrets.me
        quantized = sa.encode_update(
            delta, examples, plan, np.random.default_rng([seed, zlib.crc32(self.label.encode())])
        )
        length, bits = len(quantized), plan.modulus_bits
        total = quantized + sa.mask(secrets.seed, b"self", plan.round, length, bits)
        for v in sorted(secrets.masked_with):
            pairwise = sa.mask(secrets.pairwise[v], b"pair", plan.round, length, bits)
            total = total + pairwise if v > me else total - pairwise  # uint64: wraps modulo 2**64
        secrets.stage = protocol.MASKED_INPUT
        return (total & np.uint64((1 << bits) - 1)).astype(plan.dtype)

    def unmask(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        secrets = self.current(config, protocol.MASKED_INPUT)
        plan, me = secrets.plan, secrets.me
        survivors = sa.ids(config.get(protocol.SECAGG_SURVIVORS), "survivors", plan)
        dropped = sa.ids(config.get(protocol.SECAGG_DROPPED), "dropouts", plan)
        if survivors & dropped:
            raise ProtocolProblem(f"clients {sorted(survivors & dropped)} are named both survivor and dropout")
        if me not in survivors:
            raise ProtocolProblem("it is not named among the survivors, yet it sent its input")
        if len(survivors) < plan.survivors_needed:
            raise ProtocolProblem(
                f"only {len(survivors)} clients survived, fewer than the {plan.survivors_needed} needed"
            )
        if not dropped <= secrets.masked_with:
            raise ProtocolProblem("a dropout named is not a neighbour that shared its keys")
        secrets.stage = protocol.UNMASK  # once: a second request finds the stage passed
        shares = {v: pair[0] for v, pair in secrets.held.items() if v in survivors}
        shares.update({v: pair[1] for v, pair in secrets.held.items() if v in dropped})
        self.secrets = None  # the round's secrets are not needed any more
        return {protocol.SECAGG_SHARES: sa.pack(shares)}
