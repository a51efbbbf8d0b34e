"""`flowerpot certs`: a private CA, the server's certificate and per-client credentials.

Layout of CERTS_DIR (each folder is what one party needs; the CA's key goes to nobody):
    ca/ca.pem, ca/ca.key                              the CA: keep ca.key with the operator
    server/ca.pem, server/server.pem, server/server.key   mount on the server
    clients/NAME/ca.pem, client.pem, client.key           copy to the client called NAME
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import BadInput

log = logging.getLogger("flowerpot.certs")

DEFAULT_HOSTS = ("server", "localhost", "127.0.0.1", "::1")
CA_NAME = "Flowerpot CA"


@dataclass(frozen=True)
class Credential:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def new_ca(days: int = 3650, name: str = CA_NAME) -> Credential:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(key, hashes.SHA256())
    )
    return Credential(key, cert)


def issue(
    ca: Credential,
    common_name: str,
    *,
    hosts: tuple[str, ...] = (),
    client: bool = False,
    days: int = 825,
    not_before: dt.datetime | None = None,
) -> Credential:
    """A server certificate (with `hosts` as names) or a client certificate, signed by `ca`."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    return Credential(key, builder.sign(ca.key, hashes.SHA256()))


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_credential(folder: Path, stem: str, credential: Credential, ca: x509.Certificate) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.pem").write_bytes(pem(ca))
    (folder / f"{stem}.pem").write_bytes(pem(credential.cert))
    key_path = folder / f"{stem}.key"
    key_path.write_bytes(key_pem(credential.key))
    key_path.chmod(0o600)


def load_ca(folder: Path) -> Credential:
    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Credential(key, x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes()))


def make_certs(
    certs_dir: Path,
    clients: list[str],
    extra_hosts: tuple[str, ...] = (),
    owner: tuple[int, int] | None = None,
    renew: bool = False,
) -> list[Path]:
    """Create what is missing (with `renew`: also re-issue the server's and the named clients'
    certificates): the CA, the server bundle, one bundle per client. Returns the files written.
    With `owner` (uid, gid) every file and folder is given to that user, e.g. the containers'
    user, so that read-only mounts are readable inside while keys stay 0600."""
    written: list[Path] = []
    ca_dir = certs_dir / "ca"
    if (ca_dir / "ca.key").is_file():
        ca = load_ca(ca_dir)
    else:
        ca = new_ca()
        ca_dir.mkdir(parents=True, exist_ok=True)
        (ca_dir / "ca.pem").write_bytes(pem(ca.cert))
        (ca_dir / "ca.key").write_bytes(key_pem(ca.key))
        (ca_dir / "ca.key").chmod(0o600)
        written += [ca_dir / "ca.pem", ca_dir / "ca.key"]
    server_dir = certs_dir / "server"
    if renew or not (server_dir / "server.pem").is_file():
        hosts = tuple(dict.fromkeys((*DEFAULT_HOSTS, *extra_hosts)))
        write_credential(server_dir, "server", issue(ca, "server", hosts=hosts), ca.cert)
        written += [server_dir / n for n in ("ca.pem", "server.pem", "server.key")]
        log.info("server certificate for %s in %s", ", ".join(hosts), server_dir)
    for name in clients:
        if not name or "/" in name or name.startswith("."):
            raise BadInput(f"client name {name!r} cannot name a folder: use letters, digits, - or _")
        folder = certs_dir / "clients" / name
        if renew or not (folder / "client.pem").is_file():
            write_credential(folder, "client", issue(ca, name, client=True), ca.cert)
            written += [folder / n for n in ("ca.pem", "client.pem", "client.key")]
            log.info("client certificate for %s in %s", name, folder)
    if owner is not None:
        for path in [certs_dir, *certs_dir.rglob("*")]:
            os.chown(path, *owner)
    return written


# Client authentication --------------------------------------------------------------------------
# A client proves it holds a certificate issued by the server's CA: on every join it sends the
# certificate and a signature, made with the certificate's key, over a fresh timestamp. The
# server checks both in Python (not inside gRPC's TLS handshake), so it can tell every refused
# client why, and log who it was by the certificate's subject. The connection itself is TLS.

PROOF_LABEL = b"flowerpot-join-v1|"
MAX_CLOCK_SKEW = dt.timedelta(minutes=5)


class CredentialRefused(Exception):
    """A client credential that does not pass; `who` names it for the log."""

    def __init__(self, who: str, reason: str) -> None:
        super().__init__(reason)
        self.who, self.reason = who, reason


def join_proof(credential: Credential, now: dt.datetime | None = None) -> dict[str, str]:
    """What a client sends with its join: certificate, timestamp, signature over both."""
    stamp = (now or dt.datetime.now(dt.UTC)).isoformat()
    cert_pem = pem(credential.cert)
    signature = credential.key.sign(PROOF_LABEL + stamp.encode() + b"|" + cert_pem, ec.ECDSA(hashes.SHA256()))
    return {"cert": cert_pem.decode(), "time": stamp, "signature": signature.hex()}


def check_proof(proof: dict[str, str], ca: x509.Certificate, now: dt.datetime | None = None) -> str:
    """The client's name (its certificate's common name) when the proof holds, else CredentialRefused."""
    now = now or dt.datetime.now(dt.UTC)
    if not proof.get("cert"):
        raise CredentialRefused("(no certificate)", "no client certificate: this server requires one issued by its CA")
    try:
        cert = x509.load_pem_x509_certificate(proof["cert"].encode())
    except ValueError:
        raise CredentialRefused("(unreadable certificate)", "the client certificate cannot be read") from None
    who = f"{_common_name(cert)} (certificate {cert.subject.rfc4514_string()}, serial {cert.serial_number:x})"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CredentialRefused(who, "the client certificate was not issued by this server's CA") from None
    if now < cert.not_valid_before_utc:
        raise CredentialRefused(
            who, f"the client certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    if now > cert.not_valid_after_utc:
        raise CredentialRefused(who, f"the client certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = []
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise CredentialRefused(who, "the certificate is not a client certificate")
    try:
        stamp = dt.datetime.fromisoformat(proof["time"])
        public_key = cert.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        public_key.verify(
            bytes.fromhex(proof["signature"]),
            PROOF_LABEL + proof["time"].encode() + b"|" + proof["cert"].encode(),
            ec.ECDSA(hashes.SHA256()),
        )
    except (KeyError, ValueError, TypeError, AssertionError, InvalidSignature):
        raise CredentialRefused(who, "the proof of holding the certificate's key does not verify") from None
    if abs(now - stamp) > MAX_CLOCK_SKEW:
        raise CredentialRefused(who, f"the proof is dated {stamp:%Y-%m-%d %H:%M:%S} UTC: check the client's clock")
    return _common_name(cert)


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()
