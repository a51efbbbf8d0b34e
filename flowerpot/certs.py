"""`flowerpot certs`: a private CA, the server's certificate and per-client credentials.

Layout of CERTS_DIR (each folder is what one party needs; the CA's key goes to nobody):
    ca/ca.pem, ca/ca.key, ca/issued.json              the CA: keep it with the operator
    server/ca.pem, server/server.pem, server/server.key   mount on the server
    server/revoked.json                               client certificates the server refuses
    clients/NAME/ca.pem, client.pem, client.key           copy to the client called NAME
    requests/NAME.csr, requests/NAME.pem              a site's request, and the certificate for it

Clients prove who they are with mutual TLS: the server's gRPC credentials require a client
certificate from the CA, so a copied certificate without its key cannot complete a handshake.
What TLS cannot decide (revocation, the allow-list) the server checks at every join.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import BadInput
from shared.revocation import REVOKED_FILE, add_revoked
from shared.tls_files import check_key, common_name

log = logging.getLogger("flowerpot.certs")

DEFAULT_HOSTS = ("server", "localhost", "127.0.0.1", "::1")
CA_NAME = "Flowerpot CA"
CA_DAYS = 3650  # the CA signs, it is never presented alone: it lives longer, kept offline (encrypted)
CERT_DAYS = 365  # server and client certificates: a stolen one is useful for at most a year
ISSUED_FILE = "issued.json"  # in ca/: every certificate the CA signed, so that `--revoke NAME` finds them
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
MAX_ID = 2**32 - 2  # the largest uid/gid chown accepts (2**32 - 1 means "unchanged")


@dataclass(frozen=True)
class Credential:
    key: CertificateIssuerPrivateKeyTypes
    cert: x509.Certificate


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_ca(days: int = CA_DAYS, name: str = CA_NAME) -> Credential:
    key = new_key()
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
    days: int = CERT_DAYS,
    not_before: dt.datetime | None = None,
    key: CertificateIssuerPrivateKeyTypes | None = None,
) -> Credential:
    """A server certificate (with `hosts` as names) or a client certificate, signed by `ca`."""
    key = key or new_key()
    return Credential(
        key,
        sign_public_key(
            ca, common_name, key.public_key(), hosts=hosts, client=client, days=days, not_before=not_before
        ),
    )


def sign_public_key(
    ca: Credential,
    common_name: str,
    public_key: CertificatePublicKeyTypes,
    *,
    hosts: tuple[str, ...] = (),
    client: bool = False,
    days: int = CERT_DAYS,
    not_before: dt.datetime | None = None,
) -> x509.Certificate:
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


# Checks of what the operator gives, all made before any file is written -------------------------


def parse_hosts(text: str) -> tuple[str, ...]:
    """CERT_HOSTS as certificate names: IPs as they are, DNS names IDNA-encoded (bücher.example
    becomes xn--bcher-kva.example, the form clients dial and TLS compares)."""
    hosts = []
    for raw in text.split(","):
        host = raw.strip()
        if not host:
            continue
        try:
            hosts.append(str(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        problem = None
        try:
            encoded = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            encoded, problem = "", "it is not a valid internationalized domain name"
        if problem is None and not all(_DNS_LABEL.fullmatch(label) for label in encoded.split(".")):
            problem = "a DNS name has only letters, digits, - and . (no spaces), labels of 1 to 63 characters"
        if problem is not None:
            raise BadInput(
                f"CERT_HOSTS={text!r} is not valid: {host!r} is neither an IP address nor a DNS name ({problem}); "
                "use a comma-separated list such as server.example.com,203.0.113.10 (in .env or the environment)"
            )
        hosts.append(encoded)
    return tuple(hosts)


def parse_owner(text: str | None) -> tuple[int, int] | None:
    """`--owner UID:GID` (or UID) as numbers chown accepts."""
    if text is None:
        return None
    uid, _, gid = text.partition(":")
    try:
        ids = int(uid), int(gid or uid)
    except ValueError:
        ids = (-1, -1)
    if not all(0 <= i <= MAX_ID for i in ids):
        raise BadInput(f"--owner {text!r}: use UID:GID with numbers from 0 to {MAX_ID}, e.g. 10001:10001")
    return ids


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise BadInput(
            f"client name {name!r} cannot name a certificate and its folder: use 1 to 64 letters, digits, ., - or _"
        )
    return name


# Files ------------------------------------------------------------------------------------------


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: CertificateIssuerPrivateKeyTypes, passphrase: str = "") -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def write_private(path: Path, data: bytes) -> None:
    """Write a key readable by its owner only from its first byte: a new file made with mode 0600
    (O_EXCL: never someone else's file), then renamed over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def write_credential(folder: Path, stem: str, credential: Credential, ca: x509.Certificate) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_private(folder / f"{stem}.key", key_pem(credential.key))
    (folder / "ca.pem").write_bytes(pem(ca))
    (folder / f"{stem}.pem").write_bytes(pem(credential.cert))


def load_ca(folder: Path, passphrase: str = "") -> Credential:
    """The CA, its key decrypted with CA_PASSPHRASE when it has one; BadInput on a wrong one."""
    key_path = folder / "ca.key"
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=passphrase.encode() or None)
    except TypeError:  # no passphrase for an encrypted key, or one for a plain key
        if passphrase:
            raise BadInput(
                f"CA_PASSPHRASE is set but {key_path} is not encrypted: unset CA_PASSPHRASE for this CA"
            ) from None
        raise BadInput(f"{key_path} is encrypted: set CA_PASSPHRASE to its passphrase (in the environment)") from None
    except ValueError:
        raise BadInput(
            f"CA_PASSPHRASE does not decrypt {key_path} (or the file is not a PEM key): give the passphrase "
            "the CA was made with"
        ) from None
    try:
        cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    except (OSError, ValueError) as exc:
        raise BadInput(
            f"{folder / 'ca.pem'} is missing or not a PEM certificate ({exc.__class__.__name__}): restore it "
            f"beside {key_path}, or move {folder} aside to make a new CA"
        ) from None
    return Credential(key, cert)  # type: ignore[arg-type]


def _issued(path: Path) -> list[dict[str, Any]]:
    """ca/issued.json: what the CA issued, by name; BadInput when it is not such a list."""
    if not path.is_file():
        return []
    try:
        issued = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"{path} is corrupt ({exc.__class__.__name__}): restore it from a backup") from None
    if not isinstance(issued, list) or not all(isinstance(e, dict) for e in issued):
        raise BadInput(f"{path} is corrupt (not a list of certificates): restore it from a backup")
    return issued


def _record(ca_dir: Path, name: str, cert: x509.Certificate, kind: str) -> None:
    """Note an issued certificate in ca/issued.json, so that it can be revoked by name later."""
    path = ca_dir / ISSUED_FILE
    issued = _issued(path)
    issued.append(
        {
            "name": name,
            "kind": kind,
            "serial": f"{cert.serial_number:x}",
            "not_after": f"{cert.not_valid_after_utc:%Y-%m-%d}",
        }
    )
    path.write_text(json.dumps(issued, indent=1) + "\n")


# The command's jobs -----------------------------------------------------------------------------


def open_ca(certs_dir: Path, passphrase: str = "") -> tuple[Credential, list[Path]]:
    """The CA of CERTS_DIR, made (ca/ readable by the caller only) when there is none."""
    ca_dir = certs_dir / "ca"
    if (ca_dir / "ca.key").is_file():
        return load_ca(ca_dir, passphrase), []
    ca = new_ca()
    ca_dir.mkdir(parents=True, exist_ok=True)
    ca_dir.chmod(0o700)
    write_private(ca_dir / "ca.key", key_pem(ca.key, passphrase))
    (ca_dir / "ca.pem").write_bytes(pem(ca.cert))
    return ca, [ca_dir / "ca.pem", ca_dir / "ca.key"]


def make_certs(
    certs_dir: Path,
    clients: list[str],
    extra_hosts: tuple[str, ...] = (),
    owner: tuple[int, int] | None = None,
    renew: bool = False,
    passphrase: str = "",
) -> list[Path]:
    """Create what is missing (with `renew`: also re-issue the server's and the named clients'
    certificates): the CA, the server bundle, one bundle per client. Returns the files written.
    With `owner` (uid, gid) the server's and clients' files are given to that user, e.g. the
    containers' user, so that read-only mounts are readable inside while keys stay 0600; the CA
    stays with the caller."""
    for name in clients:
        check_name(name)
    ca, written = open_ca(certs_dir, passphrase)
    server_dir = certs_dir / "server"
    if renew or not (server_dir / "server.pem").is_file():
        hosts = tuple(dict.fromkeys((*DEFAULT_HOSTS, *extra_hosts)))
        credential = issue(ca, "server", hosts=hosts)
        write_credential(server_dir, "server", credential, ca.cert)
        _record(certs_dir / "ca", "server", credential.cert, "server")
        written += [server_dir / n for n in ("ca.pem", "server.pem", "server.key")]
        log.info("server certificate for %s in %s", ", ".join(hosts), server_dir)
    for name in clients:
        folder = certs_dir / "clients" / name
        if renew or not (folder / "client.pem").is_file():
            credential = issue(ca, name, client=True)
            write_credential(folder, "client", credential, ca.cert)
            _record(certs_dir / "ca", name, credential.cert, "client")
            written += [folder / n for n in ("ca.pem", "client.pem", "client.key")]
            log.info("client certificate for %s in %s", name, folder)
    give_away(certs_dir, owner)
    return written


def give_away(certs_dir: Path, owner: tuple[int, int] | None) -> None:
    """Give the server's and the clients' files to `owner`. ca/ stays the caller's: when the
    caller is root (the Compose tool), it goes to the owner of CERTS_DIR, the host's user."""
    if owner is None:
        return
    for top in ("server", "clients", "requests"):
        folder = certs_dir / top
        for path in [folder, *folder.rglob("*")] if folder.exists() else []:
            os.chown(path, *owner)
    ca_dir = certs_dir / "ca"
    if os.geteuid() == 0 and ca_dir.exists():
        host_user = certs_dir.stat()
        for path in [ca_dir, *ca_dir.rglob("*")]:
            os.chown(path, host_user.st_uid, host_user.st_gid)


def request(certs_dir: Path, name: str, owner: tuple[int, int] | None = None, renew: bool = False) -> list[Path]:
    """At a site: its key (kept in clients/NAME/) and a certificate request for the CA."""
    check_name(name)
    folder = certs_dir / "clients" / name
    key_path = folder / "client.key"
    if key_path.is_file() and not renew:
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (TypeError, ValueError):
            raise BadInput(
                f"{key_path} is encrypted or not a PEM key: move it aside, or pass --renew for a new key"
            ) from None
        written = []
    else:
        key = new_key()
        write_private(key_path, key_pem(key))
        written = [key_path]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    csr_path = certs_dir / "requests" / f"{name}.csr"
    csr_path.parent.mkdir(parents=True, exist_ok=True)
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    give_away(certs_dir, owner)
    return [*written, csr_path]


def sign(certs_dir: Path, csr_path: Path, passphrase: str = "") -> Path:
    """At the CA: a client certificate for the request in `csr_path`, written beside it (.pem)."""
    try:
        csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    except FileNotFoundError:
        raise BadInput(f"--sign {csr_path}: no such file") from None
    except OSError as exc:
        raise BadInput(f"--sign {csr_path} cannot be read ({exc.strerror}): pass the request file") from None
    except ValueError:
        raise BadInput(
            f"--sign {csr_path} is not a PEM certificate request: make one with `flowerpot certs --request NAME`"
        ) from None
    if not csr.is_signature_valid:
        raise BadInput(f"--sign {csr_path}: the request's signature does not verify: make it again")
    name = check_name(common_name(csr.subject))
    check_key(csr.public_key(), str(csr_path))
    if not (certs_dir / "ca" / "ca.key").is_file():
        raise BadInput(
            f"--sign {csr_path}: there is no CA in {certs_dir / 'ca'}: sign where the CA is (CERTS_DIR there), "
            "or make one with `flowerpot certs` first"
        )
    ca = load_ca(certs_dir / "ca", passphrase)
    cert = sign_public_key(ca, name, csr.public_key(), client=True)
    _record(certs_dir / "ca", name, cert, "client")
    out = csr_path.with_suffix(".pem")
    out.write_bytes(pem(cert))
    return out


def revoke(certs_dir: Path, names: list[str]) -> tuple[Path, list[str]]:
    """Add every certificate the CA issued to each name (and clients/NAME/client.pem) to
    server/revoked.json; (the file, the serials added)."""
    issued_path = certs_dir / "ca" / ISSUED_FILE
    issued = _issued(issued_path)
    serials: dict[str, str] = {}
    for name in names:
        found = {e["serial"]: name for e in issued if e.get("kind") == "client" and e.get("name") == name}
        local = certs_dir / "clients" / name / "client.pem"
        if local.is_file():
            found[f"{x509.load_pem_x509_certificate(local.read_bytes()).serial_number:x}"] = name
        if not found:
            raise BadInput(
                f"--revoke {name}: no certificate issued to {name!r} is known in {issued_path} or "
                f"{local}: run it where the CA is (CERTS_DIR)"
            )
        serials.update(found)
    path = certs_dir / "server" / REVOKED_FILE
    add_revoked(path, serials)
    return path, sorted(serials)
