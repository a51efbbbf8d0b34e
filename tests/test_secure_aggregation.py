"""Secure aggregation (SECURE_AGGREGATION): the server learns the sum of a round's updates and
nothing of any one of them; dropouts up to the threshold still give the sum; a relaying server
that swaps keys is caught; malformed messages drop their sender, not the round.

The protocol tests run the real gRPC server and the real client wiring in this process, with
clients whose "training" returns a known update: the test knows every true input, and records
every message the server receives."""

from __future__ import annotations

import logging
import zlib

import numpy as np
import pytest

from bench.secure_aggregation import MAX_WEIGHT, SEED, ScriptedClient, in_process, instructions, scripted
from client.secure_aggregation import Identity, Participant
from flowerpot import certs
from server.training.secure_rounds import SecureAggregator, SecureFit
from server.transport.admission import BoundedClientManager
from shared import protocol
from shared import secure_aggregation as sa
from shared.modelfile import npy_view
from shared.settings import Settings

pytestmark = pytest.mark.unit  # one process: the gRPC server and its clients are threads of the test's

SIZE = 20_000  # coordinates: a chance correlation of two unrelated inputs is about 1/sqrt(SIZE)


def secure_settings(**values: object) -> Settings:
    base: dict[str, object] = dict(
        secure_aggregation=True, min_fit_clients=3, min_available_clients=3, max_client_examples=MAX_WEIGHT,
        secagg_stage_timeout=5, round_timeout=20,
    )  # fmt: skip
    return Settings(**{**base, **values})


def secure_round(settings: Settings, manager: BoundedClientManager, server_round: int = 1) -> SecureFit:
    return SecureAggregator(settings, manager, SIZE).fit(server_round, instructions(manager, SIZE))


def expected_mean(clients: list[ScriptedClient], settings: Settings) -> np.ndarray:
    """The example-weighted mean of the clipped updates: plain FedAvg's, what the sum must give."""
    weights = [min(c.examples, MAX_WEIGHT) / MAX_WEIGHT for c in clients]
    clipped = [np.clip(c.delta, -settings.secagg_clip_range, settings.secagg_clip_range) for c in clients]
    return sum(w * d for w, d in zip(weights, clipped)) / sum(weights)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of the centred vectors: two inputs that share nothing have about 0."""
    a, b = a.astype(np.float64) - a.mean(), b.astype(np.float64) - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_the_server_holds_only_masked_inputs_and_unmasks_their_exact_sum() -> None:
    settings = secure_settings()
    clients = scripted(size=SIZE, settings=settings, behaviours=[""] * 4)
    with in_process(clients) as (manager, traffic):
        outcome = secure_round(settings, manager)
    assert outcome.failed is None and len(outcome.results) == 4 and not outcome.failures
    assert outcome.delta is not None
    error = np.abs(outcome.delta - expected_mean(clients, settings)).max()
    assert error <= outcome.error_bound and outcome.error_bound < 1e-4, (error, outcome.error_bound)
    plan = sa.Plan(1, 4, 0, settings.secagg_threshold, settings.secagg_clip_range, 22, MAX_WEIGHT)
    quantized = [
        sa.encode_update(
            c.delta, c.examples, plan, np.random.default_rng([SEED, zlib.crc32(c.participant.label.encode())])
        )
        for c in clients
    ]
    arrays = [npy_view(t) for m in traffic.messages if m.HasField("fit_res") for t in m.fit_res.parameters.tensors]
    assert len(arrays) == 4
    for array in arrays:
        for true, client in zip(quantized, clients):
            assert abs(correlation(array, true)) < 0.1
            assert abs(correlation(array[:-1], client.delta)) < 0.1
    # what the test's check would have caught: an input sent as it is
    assert correlation(quantized[0], quantized[0]) > 0.99
    # nothing else carried the update: every other message the server received is small
    others = [m for m in traffic.messages if not m.HasField("fit_res")]
    assert max(m.ByteSize() for m in others) < 4 * 1024


def test_dropouts_after_key_sharing_up_to_the_threshold_still_give_the_survivors_sum() -> None:
    settings = secure_settings()  # threshold 0.6 of 5: 3 shares rebuild a secret, 2 may drop
    clients = scripted(size=SIZE, settings=settings, behaviours=["", "drop-at-input", "", "drop-at-input", ""])
    with in_process(clients) as (manager, _):
        outcome = secure_round(settings, manager)
    assert outcome.failed is None and len(outcome.results) == 3 and len(outcome.failures) == 2
    assert all("left at masked_input" in str(f) for f in outcome.failures)
    survivors = [c for c in clients if not c.behaviour]
    assert outcome.delta is not None
    assert np.abs(outcome.delta - expected_mean(survivors, settings)).max() <= outcome.error_bound


def test_beyond_the_threshold_the_round_fails_and_the_next_one_succeeds() -> None:
    settings = secure_settings()
    clients = scripted(
        size=SIZE, settings=settings, behaviours=["", "drop-at-input", "drop-at-input", "drop-at-input", ""]
    )
    with in_process(clients) as (manager, _):
        failed = secure_round(settings, manager, 1)
        recovered = secure_round(settings, manager, 2)  # the same clients behave in round 2
    assert failed.delta is None
    assert failed.failed == "secure aggregation failed: only 2 clients sent a masked input, 3 are needed"
    assert recovered.failed is None and recovered.delta is not None
    assert np.abs(recovered.delta - expected_mean(clients, settings)).max() <= recovered.error_bound


def test_a_malformed_input_drops_its_client_and_a_wrong_share_is_left_out(caplog) -> None:
    settings = secure_settings()
    clients = scripted(size=SIZE, settings=settings, behaviours=["", "malformed-input", "wrong-share", "", ""])
    with caplog.at_level(logging.WARNING, logger="flowerpot.server"), in_process(clients) as (manager, _):
        outcome = secure_round(settings, manager)
    assert outcome.failed is None and len(outcome.results) == 4
    survivors = [c for c in clients if c.behaviour != "malformed-input"]
    assert outcome.delta is not None
    assert np.abs(outcome.delta - expected_mean(survivors, settings)).max() <= outcome.error_bound
    lines = [r.getMessage() for r in caplog.records]
    assert any("left at masked_input: its masked input is uint32 of shape (3,)" in line for line in lines), lines
    assert any("revealed a wrong share of client" in line and "it was left out" in line for line in lines), lines


def test_unusable_keys_drop_their_sender_at_the_first_stage(caplog) -> None:
    settings = secure_settings()
    clients = scripted(size=SIZE, settings=settings, behaviours=["", "zero-key", "", "nested-keys", ""])
    with caplog.at_level(logging.WARNING, logger="flowerpot.server"), in_process(clients) as (manager, _):
        outcome = secure_round(settings, manager)
    assert outcome.failed is None and len(outcome.results) == 3
    assert sorted(str(f).split(" left at ")[1].split(":")[0] for f in outcome.failures) == ["advertise"] * 2
    honest = [c for c in clients if not c.behaviour]
    assert outcome.delta is not None
    assert np.abs(outcome.delta - expected_mean(honest, settings)).max() <= outcome.error_bound


# --- the client's own checks, with the test as the relaying server -------------------------------


def config(stage: str, plan: sa.Plan, me: int, **values: object) -> dict:
    return {protocol.SECAGG_STAGE: stage, protocol.SECAGG_PLAN: plan.to_json(), protocol.SECAGG_ID: me, **values}


def identities(count: int) -> tuple[list[Identity], certs.Credential]:
    ca = certs.new_ca()
    issued = [certs.issue(ca, f"site-{i}", client=True) for i in range(count)]
    return [Identity(certs.key_pem(c.key), certs.pem(c.cert), certs.pem(ca.cert)) for c in issued], ca


def test_a_key_swapped_by_the_relaying_server_is_caught_by_the_signature() -> None:
    settings = secure_settings()
    ids, _ = identities(3)
    plan = sa.Plan(1, 3, 0, 0.6, 1.0, 22, MAX_WEIGHT)
    participants = [Participant(settings, ids[i], f"site-{i}") for i in range(3)]
    keys = {
        u: p.answer(config(protocol.ADVERTISE, plan, u))[protocol.SECAGG_KEYS] for u, p in enumerate(participants, 1)
    }
    # The server puts its own key in place of client 2's, keeping client 2's signature and certificate.
    entry = sa.Advertised.from_bytes(keys[2])
    swapped = sa.Advertised(sa.public_bytes(sa.new_key()), entry.s_public, entry.signature, entry.certificate)
    answer = participants[0].answer(
        config(protocol.SHARE_KEYS, plan, 1, **{protocol.SECAGG_PEERS: sa.pack({**keys, 2: swapped.to_bytes()})})
    )
    assert answer == {
        protocol.SECAGG_PROBLEM: "client 2's keys are refused: the signature over its keys does not verify "
        "(the keys were changed on the way)"
    }
    # ... or its own key pair signed with a certificate of its own CA: not the clients' CA
    forged_ids, _ = identities(1)
    c_key, s_key = sa.new_key(), sa.new_key()
    message = sa.keys_message(1, 2, sa.public_bytes(c_key), sa.public_bytes(s_key))
    forged = sa.Advertised(
        sa.public_bytes(c_key),
        sa.public_bytes(s_key),
        sa.sign(forged_ids[0].private_key, message),
        forged_ids[0].certificate,
    )
    # ... or keys signed with the server's own certificate, from the same CA as the clients'
    server_ids, server_ca = identities(1)
    server_cert = certs.issue(server_ca, "server", hosts=("localhost",))
    as_server = sa.Advertised(
        sa.public_bytes(c_key), sa.public_bytes(s_key), sa.sign(certs.key_pem(server_cert.key), message),
        certs.pem(server_cert.cert),
    )  # fmt: skip
    fooled = Participant(
        settings, Identity(server_ids[0].private_key, server_ids[0].certificate, certs.pem(server_ca.cert)), "x"
    )
    mine = fooled.answer(config(protocol.ADVERTISE, plan, 3))[protocol.SECAGG_KEYS]
    answer = fooled.answer(
        config(protocol.SHARE_KEYS, plan, 3, **{protocol.SECAGG_PEERS: sa.pack({2: as_server.to_bytes(), 3: mine})})
    )
    assert "its certificate is not a client certificate" in answer[protocol.SECAGG_PROBLEM]
    participants[1].answer(config(protocol.ADVERTISE, plan, 2))  # a new round for client 2: fresh keys
    answer = participants[2].answer(
        config(protocol.SHARE_KEYS, plan, 3, **{protocol.SECAGG_PEERS: sa.pack({**keys, 2: forged.to_bytes()})})
    )
    assert (
        "client 2's keys are refused: its certificate was not issued by this client's CA"
        in answer[protocol.SECAGG_PROBLEM]
    )
    # the honest relay is taken
    fresh = Participant(settings, ids[0], "site-0")
    keys[1] = fresh.answer(config(protocol.ADVERTISE, plan, 1))[protocol.SECAGG_KEYS]
    assert protocol.SECAGG_CIPHERTEXTS in fresh.answer(
        config(protocol.SHARE_KEYS, plan, 1, **{protocol.SECAGG_PEERS: sa.pack(keys)})
    )


def test_a_client_reveals_one_share_per_neighbour_once_and_refuses_an_unsafe_plan() -> None:
    settings = secure_settings()
    plan = sa.Plan(1, 3, 0, 0.6, 1.0, 22, MAX_WEIGHT)
    participants = [Participant(settings, None, f"site-{i}") for i in range(3)]
    keys = {
        u: p.answer(config(protocol.ADVERTISE, plan, u))[protocol.SECAGG_KEYS] for u, p in enumerate(participants, 1)
    }
    sealed = {
        u: sa.unpack(
            p.answer(config(protocol.SHARE_KEYS, plan, u, **{protocol.SECAGG_PEERS: sa.pack(keys)}))[
                protocol.SECAGG_CIPHERTEXTS
            ],
            "",
            10**6,
        )
        for u, p in enumerate(participants, 1)
    }
    first = participants[0]
    delivered = sa.pack({v: sealed[v][1] for v in (2, 3)})
    secrets = first.prepare_input(config(protocol.MASKED_INPUT, plan, 1, **{protocol.SECAGG_CIPHERTEXTS: delivered}))
    first.masked_input(secrets, np.zeros(10), 100, SEED)
    # Told that 3 both survived and dropped out: refused, nothing revealed
    both = config(
        protocol.UNMASK, plan, 1, **{protocol.SECAGG_SURVIVORS: b"[1, 2, 3]", protocol.SECAGG_DROPPED: b"[3]"}
    )
    assert "named both survivor and dropout" in first.answer(both)[protocol.SECAGG_PROBLEM]
    assert "out of order" in first.answer(both)[protocol.SECAGG_PROBLEM]  # the round's secrets are gone
    # An honest unmask, once
    for p, u in ((participants[1], 2),):
        secrets = p.prepare_input(
            config(
                protocol.MASKED_INPUT,
                plan,
                u,
                **{protocol.SECAGG_CIPHERTEXTS: sa.pack({v: sealed[v][u] for v in (1, 3)})},
            )
        )
        p.masked_input(secrets, np.zeros(10), 100, SEED)
    two = config(protocol.UNMASK, plan, 2, **{protocol.SECAGG_SURVIVORS: b"[1, 2]", protocol.SECAGG_DROPPED: b"[3]"})
    # a sum of 2 would tell each the other's update: refused, whatever the threshold allows
    assert "fewer than the 3 needed" in participants[1].answer(two)[protocol.SECAGG_PROBLEM]
    p = participants[1] = Participant(settings, None, "site-1")  # the round again, from its first stage
    keys[2] = p.answer(config(protocol.ADVERTISE, plan, 2))[protocol.SECAGG_KEYS]
    sealed[2] = sa.unpack(
        p.answer(config(protocol.SHARE_KEYS, plan, 2, **{protocol.SECAGG_PEERS: sa.pack(keys)}))[
            protocol.SECAGG_CIPHERTEXTS
        ],
        "",
        10**6,
    )
    # the others' shares for 2 were sealed to its old key: it opens none, and still masks with both
    secrets = p.prepare_input(
        config(
            protocol.MASKED_INPUT, plan, 2, **{protocol.SECAGG_CIPHERTEXTS: sa.pack({v: sealed[v][2] for v in (1, 3)})}
        )
    )
    p.masked_input(secrets, np.zeros(10), 100, SEED)
    unmask = config(
        protocol.UNMASK, plan, 2, **{protocol.SECAGG_SURVIVORS: b"[1, 2, 3]", protocol.SECAGG_DROPPED: b"[]"}
    )
    shares = sa.unpack(p.answer(unmask)[protocol.SECAGG_SHARES], "", 100)
    assert sorted(shares) == [2]  # its own seed share: the others' did not open
    again = participants[1].answer(unmask)
    assert "out of order" in again[protocol.SECAGG_PROBLEM]
    # A server that lowers the threshold, or sets one that lets two groups rebuild both secrets
    for threshold in (0.5, 0.3):
        low = sa.Plan(2, 3, 0, threshold, 1.0, 22, MAX_WEIGHT)
        answer = Participant(Settings(), None, "x").answer(config(protocol.ADVERTISE, low, 1))
        assert "a strict majority of a neighbourhood is needed" in answer[protocol.SECAGG_PROBLEM]
    other = sa.Plan(2, 3, 0, 0.9, 1.0, 22, MAX_WEIGHT)
    assert (
        "run both with the same .env"
        in participants[2].answer(config(protocol.ADVERTISE, other, 1))[protocol.SECAGG_PROBLEM]
    )


def test_the_neighbourhoods_are_symmetric_and_a_strict_majority_rebuilds() -> None:
    for n, k in ((5, 0), (10, 4), (100, 16), (1000, 16)):
        plan = sa.Plan(1, n, k, 0.6, 1.0, 22, 100)
        for u in range(1, n + 1):
            assert all(u in plan.neighbours_of(v) for v in plan.neighbours_of(u))
        assert len(plan.neighbours_of(1)) == plan.group - 1 == (n - 1 if k == 0 else k)
        assert plan.shares_needed > plan.group / 2
    secret = b"s" * 32
    shares = sa.split(secret, 3, 5)
    assert sa.rebuild(shares[:3]) == secret and sa.rebuild(shares[2:]) == secret


def test_one_certificate_signs_for_at_most_max_connections_per_client_neighbours() -> None:
    """A colluding client's certificate cannot vouch for every neighbour of its target."""
    settings = secure_settings(max_connections_per_client=1)
    ids, _ = identities(2)
    plan = sa.Plan(1, 4, 0, 0.6, 1.0, 22, MAX_WEIGHT)
    target = Participant(settings, ids[0], "target")
    keys = {1: target.answer(config(protocol.ADVERTISE, plan, 1))[protocol.SECAGG_KEYS]}
    for v in (2, 3, 4):  # keys the server made, all signed with the one colluding certificate
        c_key, s_key = sa.new_key(), sa.new_key()
        message = sa.keys_message(1, v, sa.public_bytes(c_key), sa.public_bytes(s_key))
        signature = sa.sign(ids[1].private_key, message)
        keys[v] = sa.Advertised(
            sa.public_bytes(c_key), sa.public_bytes(s_key), signature, ids[1].certificate
        ).to_bytes()
    answer = target.answer(config(protocol.SHARE_KEYS, plan, 1, **{protocol.SECAGG_PEERS: sa.pack(keys)}))
    assert "one certificate signs the keys of more than MAX_CONNECTIONS_PER_CLIENT=1" in answer[protocol.SECAGG_PROBLEM]
