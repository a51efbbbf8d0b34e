"""Reading the certificate bundles that `flowerpot certs` writes, with clear errors."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shared.errors import BadInput


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
            "(README: Deploy on EC2 with TLS), or set CERTS_DIR"
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
    if key.public_key().public_bytes(*_SPKI) != cert.public_key().public_bytes(*_SPKI):
        raise BadInput(f"{key_path} is not the key of {cert_path}: copy both from the same `flowerpot certs` run")
    now = dt.datetime.now(dt.UTC)
    if check_dates and not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise BadInput(
            f"{cert_path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}: issue a new one with `flowerpot certs --renew`"
        )


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
