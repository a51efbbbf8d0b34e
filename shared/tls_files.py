"""Reading the certificate bundles that `flowerpot certs` writes, with clear errors."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from shared.errors import BadInput


def common_name(subject: x509.Name) -> str:
    """The subject's common name (CN), the name a certificate gives its holder; "" when it has none."""
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def bundle(certs_dir: Path, sub: str) -> Path:
    """CERTS_DIR/sub when it exists (the whole tree, as `certs` writes it), else CERTS_DIR itself
    (one bundle mounted on its own, as in the containers)."""
    return certs_dir / sub if (certs_dir / sub).is_dir() else certs_dir


def read_pem(folder: Path, name: str) -> bytes:
    path = folder / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadInput(
            f"TLS_ENABLED=true but {path} is missing: create the certificates with `flowerpot certs` "
            "(docs/deployment.md: Deploy on EC2 with TLS), or set CERTS_DIR"
        ) from None
    except OSError as exc:
        raise BadInput(
            f"{path} cannot be read ({os.strerror(exc.errno or 0)}): give it to the user that runs "
            "flowerpot (in the containers, uid 10001: `flowerpot certs --owner 10001:10001`)"
        ) from None


def load_certificate(path: Path, data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise BadInput(f"{path} is not a PEM certificate: run `flowerpot certs` again") from None


def check_pair(cert_path: Path, cert_pem: bytes, key_pem: bytes, check_dates: bool = True) -> None:
    """The certificate is readable, belongs to the key, and (`check_dates`) is current."""
    cert = load_certificate(cert_path, cert_pem)
    key_path = cert_path.with_suffix(".key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise BadInput(f"{key_path} is not an unencrypted PEM private key: run `flowerpot certs` again") from None
    check_key(cert.public_key(), str(cert_path))
    if key.public_key().public_bytes(*_SPKI) != cert.public_key().public_bytes(*_SPKI):
        raise BadInput(f"{key_path} is not the key of {cert_path}: copy both from the same `flowerpot certs` run")
    now = dt.datetime.now(dt.UTC)
    if check_dates and not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise BadInput(
            f"{cert_path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}: issue a new one with `flowerpot certs --renew`"
        )


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def client_certificate_problems(cert_pem: bytes, ca_pem: bytes) -> list[str]:
    """What this side can see wrong with its own client certificate, to explain a handshake that
    the server ended (a TLS server tells the client nothing more)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return ["this client's certificate cannot be read"]
    problems = []
    now = dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        problems.append(f"this client's certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}: ask for a new one")
    elif now < cert.not_valid_before_utc:
        problems.append(f"this client's certificate is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (ValueError, TypeError, InvalidSignature):
        problems.append(
            "this client's certificate was not issued by the CA in its ca.pem: the server accepts only "
            "certificates of its own CA"
        )
    return problems


def check_key(public_key: object, where: str) -> None:
    """EC keys (P-256 and up) and RSA keys of 2048 bits and more are accepted; others refused."""
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.key_size >= 256:
        return
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size >= 2048:
        return
    raise BadInput(
        f"{where} holds a key TLS here does not take ({type(public_key).__name__.removesuffix('PublicKey')}): "
        "use an EC P-256 key or RSA of 2048 bits and more (`flowerpot certs` makes EC P-256 keys)"
    )
