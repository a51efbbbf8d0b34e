"""SecAgg+ (Bell et al. 2020, after Bonawitz et al. 2017): what its clients and its server share.

The pieces are maintained code, none hand-rolled: key agreement is X25519 and HKDF-SHA256, the
shares travel sealed with ChaCha20-Poly1305, masks are a ChaCha20 key stream (all from the
`cryptography` package), secrets are split with Flower's Shamir sharing (pycryptodome's, 16-byte
chunks). Updates are quantized as Flower's quantizer does, with the fit's own generator. Flower's own mask generator
(`pseudo_rand_gen`) is not used: it folds its key into a 32-bit seed of NumPy's RandomState, so
one mask could be found by trying 2**32 seeds.

A round's `Plan` is announced by the server and checked by every client: `sampled` clients are
numbered 1..n in the round; each one's neighbourhood is every other client (SecAgg) or, with
`neighbours` = k, the k nearest on a ring (SecAgg+); a secret is split among the neighbourhood
and the client itself, and `shares_needed` of them (a strict majority, so that no two disjoint
groups can rebuild both of one client's secrets) rebuild it.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

DOMAIN = b"flowerpot-secagg-1"  # in every derived key, signed message and hash: no reuse across protocols
KEY_BYTES = 32  # an X25519 key, a self-mask seed
SHARE_BYTES = 4 + 48  # Flower's share of a 32-byte secret: its index, and three 16-byte chunks
MAX_SIGNATURE_BYTES = 1024  # an RSA-4096 signature is 512
MAX_CERTIFICATE_BYTES = 16 * 1024
MAX_CIPHERTEXT_BYTES = 12 + 16 + 16 + 2 * SHARE_BYTES + 16  # nonce, ids and length, two shares, tag


class ProtocolProblem(ValueError):
    """A message of the protocol that is malformed or fails a check: its sender leaves the round."""


@dataclass(frozen=True)
class Plan:
    """One secure round's parameters, as the server announces them."""

    round: int
    sampled: int  # n: the clients are 1..n
    neighbours: int  # SECAGG_NEIGHBOURS; 0: every other client
    threshold: float  # SECAGG_THRESHOLD: the share of a neighbourhood that rebuilds a secret
    clip_range: float  # SECAGG_CLIP_RANGE: each coordinate of an update, at most this in size
    bits: int  # SECAGG_QUANTIZATION_BITS
    max_weight: int  # the example count at which a client's weight is 1 (larger counts: clipped)

    @property
    def group(self) -> int:
        """A neighbourhood's size, the client itself included."""
        if self.neighbours == 0 or self.neighbours >= self.sampled - 1:
            return self.sampled
        return self.neighbours + 1

    @property
    def shares_needed(self) -> int:
        return max(2, math.ceil(self.threshold * self.group - 1e-9), self.group // 2 + 1)

    @property
    def survivors_needed(self) -> int:
        """Clients whose inputs a sum needs: a neighbourhood's threshold, and never fewer than 3
        (of 2, each could tell the other's update from the sum and its own)."""
        return max(3, self.shares_needed)

    @property
    def levels(self) -> int:
        """Quantization levels: a coordinate becomes an integer from 0 to this."""
        return 2**self.bits

    @property
    def modulus_bits(self) -> int:
        """The field is the integers modulo 2**this: the sum of n quantized inputs never wraps."""
        return self.bits + math.ceil(math.log2(self.sampled + 1))

    @property
    def dtype(self) -> np.dtype:
        """What a masked input travels as: 4 bytes a coordinate while the field fits in them."""
        return np.dtype("<u4") if self.modulus_bits <= 32 else np.dtype("<u8")

    def neighbours_of(self, client: int) -> list[int]:
        """The others whose pairwise masks and shares `client` (1..n) has: all, or a ring's k nearest."""
        n = self.sampled
        if self.group == n:
            return [v for v in range(1, n + 1) if v != client]
        half = self.neighbours // 2
        return sorted({(client - 1 + off) % n + 1 for off in range(-half, half + 1) if off != 0})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: Any) -> Plan:
        try:
            fields = json.loads(text)
            plan = cls(
                round=int(fields["round"]),
                sampled=int(fields["sampled"]),
                neighbours=int(fields["neighbours"]),
                threshold=float(fields["threshold"]),
                clip_range=float(fields["clip_range"]),
                bits=int(fields["bits"]),
                max_weight=int(fields["max_weight"]),
            )
        except (TypeError, ValueError, KeyError, RecursionError) as exc:
            raise ProtocolProblem(f"the round's plan is malformed ({exc})") from None
        problem = plan.unsafe()
        if problem is not None:
            raise ProtocolProblem(f"the round's plan is refused: {problem}")
        return plan

    def unsafe(self) -> str | None:
        """Why a client must not take part in a round with this plan, whatever its server says."""
        if not 3 <= self.sampled <= 100_000:
            return f"{self.sampled} clients (secure aggregation needs 3 or more)"
        if not 0.5 < self.threshold <= 1 or self.shares_needed > self.group:
            return f"threshold {self.threshold:g} (a strict majority of a neighbourhood is needed)"
        if self.neighbours < 0 or self.neighbours % 2:
            return f"{self.neighbours} neighbours (an even number, or 0 for all)"
        if not 8 <= self.bits <= 30 or not self.clip_range > 0 or not math.isfinite(self.clip_range):
            return f"quantization of {self.bits} bits within {self.clip_range:g}"
        if self.max_weight < 1:
            return f"a maximum weight of {self.max_weight}"
        return None


# --- keys, signatures, sealing ------------------------------------------------------------------


def new_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def private_key(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def agree(own: X25519PrivateKey, peer_public: bytes, purpose: bytes, round_: int) -> bytes:
    """A 32-byte key both ends derive alike (X25519, then HKDF-SHA256 bound to purpose and round)."""
    try:
        secret = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise ProtocolProblem(f"a public key is unusable ({exc})") from None
    info = DOMAIN + purpose + round_.to_bytes(8, "little")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def keys_message(round_: int, client: int, c_public: bytes, s_public: bytes) -> bytes:
    """What a client signs: its two public keys, for this round and its number in it."""
    return hashlib.sha256(
        DOMAIN + b"keys" + round_.to_bytes(8, "little") + client.to_bytes(8, "little") + c_public + s_public
    ).digest()


def sign(private_key_pem: bytes, message: bytes) -> bytes:
    """The message signed with a client certificate's key (EC: ECDSA; RSA: PSS; SHA-256)."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, _PSS, hashes.SHA256())
    raise ProtocolProblem(f"a client key of type {type(key).__name__} cannot sign (an EC or RSA key is needed)")


_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


def signature_problem(certificate_pem: bytes, ca_pem: bytes, message: bytes, signature: bytes) -> str | None:
    """Why `signature` is not `message` signed by the key of a certificate that the CA issued, or None."""
    try:
        cert = x509.load_pem_x509_certificate(certificate_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        return "its certificate cannot be read"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "its certificate was not issued by this client's CA"
    # Only a client certificate: the server's own (same CA) must not vouch for keys it relays.
    if _usages(cert) != {ExtendedKeyUsageOID.CLIENT_AUTH} or _is_ca(cert):
        return "its certificate is not a client certificate (the server's, or a CA's, cannot sign a client's keys)"
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return "its certificate is not valid now (expired, or not yet valid)"
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, _PSS, hashes.SHA256())
        else:
            return f"its certificate holds a {type(key).__name__}, which cannot sign"
    except InvalidSignature:
        return "the signature over its keys does not verify (the keys were changed on the way)"
    return None


def _usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return set()


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def certificate_id(certificate_pem: bytes) -> bytes:
    """What tells two certificates apart: the SHA-256 of the PEM as sent."""
    return hashlib.sha256(certificate_pem).digest()


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, DOMAIN + associated)


def unseal(key: bytes, blob: bytes, associated: bytes) -> bytes:
    if not 12 + 16 <= len(blob) <= MAX_CIPHERTEXT_BYTES:
        raise ProtocolProblem(f"a sealed share of {len(blob)} bytes")
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:12], blob[12:], DOMAIN + associated)
    except InvalidTag:
        raise ProtocolProblem("a sealed share does not open (wrong key, or changed on the way)") from None


def route(round_: int, sender: int, receiver: int) -> bytes:
    """A sealed share's associated data: it opens only for this round, sender and receiver."""
    return round_.to_bytes(8, "little") + sender.to_bytes(8, "little") + receiver.to_bytes(8, "little")


def share_plaintext(sender: int, receiver: int, seed_share: bytes, key_share: bytes) -> bytes:
    return share_keys_plaintext_concat(sender, receiver, seed_share, key_share)


def share_parts(plaintext: bytes, sender: int, receiver: int) -> tuple[bytes, bytes]:
    """(self-mask seed share, mask key share) of an opened share, checked to be between these two."""
    src, dst, seed_share, key_share = share_keys_plaintext_separate(plaintext)
    if (src, dst) != (sender, receiver) or len(seed_share) != SHARE_BYTES or len(key_share) != SHARE_BYTES:
        raise ProtocolProblem("an opened share is not the one its envelope names")
    return seed_share, key_share


def split(secret: bytes, needed: int, holders: int) -> list[bytes]:
    return create_shares(secret, needed, holders)


def rebuild(shares: list[bytes]) -> bytes:
    """The secret of `shares` (ProtocolProblem when they do not combine)."""
    try:
        return combine_shares(shares)
    except (ValueError, IndexError) as exc:
        raise ProtocolProblem(f"the shares do not combine ({exc})") from None


def commitment(seed: bytes, round_: int, client: int) -> bytes:
    """A hash of a self-mask seed: lets the server tell a rebuilt seed from one a bad share spoilt."""
    return hashlib.sha256(DOMAIN + b"seed" + route(round_, client, client) + seed).digest()


# --- masks and quantization ---------------------------------------------------------------------


def mask(seed: bytes, purpose: bytes, round_: int, length: int, modulus_bits: int) -> np.ndarray:
    """`length` integers uniform modulo 2**modulus_bits: a ChaCha20 key stream keyed by `seed`."""
    info = DOMAIN + b"mask" + purpose + round_.to_bytes(8, "little")
    key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(seed)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8") & np.uint64((1 << modulus_bits) - 1)


def encode_update(delta: np.ndarray, examples: int, plan: Plan, rng: np.random.Generator) -> np.ndarray:
    """A client's input: its update clipped to +-clip_range per coordinate and weighted by its
    example count over max_weight (at most 1), with that weight (times clip_range) as one more
    coordinate, quantized to 0..levels by stochastic rounding (unbiased: the sum's error averages
    out). Flower's quantizer rounds with NumPy's global generator, which would make a run with
    the same SEED differ and logical clients share one stream; `rng` is the fit's own."""
    weight = min(max(examples, 0), plan.max_weight) / plan.max_weight
    values = np.concatenate([np.clip(delta, -plan.clip_range, plan.clip_range) * weight, [weight * plan.clip_range]])
    scaled = (values + plan.clip_range) * (plan.levels / (2 * plan.clip_range))
    floor = np.floor(scaled)
    return (floor + (rng.random(scaled.shape) < scaled - floor)).astype(np.uint64)


def decode_sum(total: np.ndarray, count: int, plan: Plan) -> tuple[np.ndarray, float]:
    """(the example-weighted mean update, the sum of weights) of the unmasked sum of `count` inputs."""
    real = total.astype(np.float64) * (2 * plan.clip_range / plan.levels) - count * plan.clip_range
    weight = float(real[-1] / plan.clip_range)
    return real[:-1] / weight if weight > 0 else real[:-1] * np.nan, weight


def error_bound(count: int, weight: float, plan: Plan) -> float:
    """The largest difference, per coordinate, between the decoded mean and the mean of the clipped
    updates: stochastic rounding moves each input by less than one level, in the sum and in the weight."""
    step = 2 * plan.clip_range / plan.levels  # one level; the weight's error moves the mean as much again
    return 2 * count * step / weight


# --- the relayed messages -----------------------------------------------------------------------


def pack(entries: dict[int, bytes]) -> bytes:
    return json.dumps({str(k): base64.b64encode(v).decode() for k, v in sorted(entries.items())}).encode()


def unpack(blob: Any, what: str, limit: int) -> dict[int, bytes]:
    """A packed {client: bytes} of at most `limit` bytes per value; ProtocolProblem when malformed."""
    try:
        if not isinstance(blob, bytes):
            raise TypeError(f"{type(blob).__name__}, not bytes")
        raw = json.loads(blob)
        entries = {int(k): base64.b64decode(v, validate=True) for k, v in raw.items()}
    except (TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise ProtocolProblem(f"its {what} are malformed ({exc})") from None
    if any(len(v) > limit for v in entries.values()):
        raise ProtocolProblem(f"its {what} hold a value longer than {limit} bytes")
    return entries


@dataclass(frozen=True)
class Advertised:
    """A client's ADVERTISE answer: two public keys (shares are sealed with c, masks agreed with s),
    signed with its client certificate when it has one."""

    c_public: bytes
    s_public: bytes
    signature: bytes = b""
    certificate: bytes = b""

    def to_bytes(self) -> bytes:
        return json.dumps({k: base64.b64encode(v).decode() for k, v in asdict(self).items()}).encode()

    @classmethod
    def from_bytes(cls, blob: Any) -> Advertised:
        try:
            if not isinstance(blob, bytes):
                raise TypeError(f"{type(blob).__name__}, not bytes")
            fields = {k: base64.b64decode(v, validate=True) for k, v in json.loads(blob).items()}
            entry = cls(**fields)
        except (TypeError, ValueError, AttributeError, RecursionError) as exc:
            raise ProtocolProblem(f"its advertised keys are malformed ({exc})") from None
        if len(entry.c_public) != KEY_BYTES or len(entry.s_public) != KEY_BYTES:
            raise ProtocolProblem("its advertised keys are not two 32-byte X25519 keys")
        if len(entry.signature) > MAX_SIGNATURE_BYTES or len(entry.certificate) > MAX_CERTIFICATE_BYTES:
            raise ProtocolProblem("its signature or certificate is too long")
        return entry


def ids(blob: Any, what: str, plan: Plan) -> set[int]:
    """A JSON list of client numbers of the round; ProtocolProblem when malformed."""
    try:
        found = json.loads(blob)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ProtocolProblem(f"the {what} are malformed ({exc})") from None
    if not isinstance(found, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in found):
        raise ProtocolProblem(f"the {what} are not a list of client numbers")
    numbers = set(found)
    if not all(1 <= v <= plan.sampled for v in numbers):
        raise ProtocolProblem(f"the {what} name a client outside 1..{plan.sampled}")
    return numbers
