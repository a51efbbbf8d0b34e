"""TLS and client authentication with real processes on loopback: who gets in, who is refused,
and what the server logs about them."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from conftest import BASE_ENV, PLAIN_CLIENT, free_address, run_cli
from flowerpot.certs import issue, key_pem, load_ca, new_ca, write_credential
from flowerpot.launcher import clean_env


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """`flowerpot certs` for three clients, as an operator runs it."""
    result = run_cli(
        ["certs", "--client", "client-1", "--client", "client-2", "--client", "client-3"],
        cwd=tmp_path,
        CERTS_DIR="certs",
    )
    assert result.returncode == 0, result.stderr
    return tmp_path / "certs"


def tls_env(data_dir: Path, tmp_path: Path, address: str, **overrides: str) -> dict[str, str]:
    return {
        **BASE_ENV,
        "DATA_DIR": str(data_dir),
        "RESULTS_DIR": str(tmp_path / "results"),
        "SERVER_LISTEN_ADDRESS": address,
        "SERVER_ADDRESS": address.replace("127.0.0.1", "localhost"),  # a name in the server's certificate
        "CERTS_DIR": str(tmp_path / "certs"),
        "TLS_ENABLED": "true",
        "CLIENT_AUTH": "certificate",
        "CONNECT_TIMEOUT": "15",
        **overrides,
    }


@pytest.mark.process
def test_certs_command_writes_bundles_with_private_keys_kept_private(certs: Path) -> None:
    assert sorted(p.relative_to(certs).as_posix() for p in certs.rglob("*") if p.is_file()) == [
        "ca/ca.key", "ca/ca.pem", "ca/issued.json",
        "clients/client-1/ca.pem", "clients/client-1/client.key", "clients/client-1/client.pem",
        "clients/client-2/ca.pem", "clients/client-2/client.key", "clients/client-2/client.pem",
        "clients/client-3/ca.pem", "clients/client-3/client.key", "clients/client-3/client.pem",
        "server/ca.pem", "server/server.key", "server/server.pem",
    ]  # fmt: skip
    for key in certs.rglob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((certs / "ca").stat().st_mode) == 0o700
    again = run_cli(["certs", "--client", "client-1"], cwd=certs.parent, CERTS_DIR="certs")
    assert again.returncode == 0 and "nothing to do" in again.stdout  # existing credentials are kept


@pytest.mark.process
def test_certificates_live_a_year_and_the_ca_ten(certs: Path) -> None:
    def days(path: Path) -> int:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        return (cert.not_valid_after_utc - cert.not_valid_before_utc).days

    assert days(certs / "server" / "server.pem") == 365
    assert days(certs / "clients" / "client-1" / "client.pem") == 365
    assert days(certs / "ca" / "ca.pem") == 3650


@pytest.mark.process
def test_keys_are_private_from_their_first_byte_whatever_the_umask(tmp_path: Path) -> None:
    """With umask 0 a file written then chmod-ed would be world-readable for a moment; keys are
    created with mode 0600 (the test sees the end state; flowerpot.certs.write_private the means)."""
    result = subprocess.run(
        [sys.executable, "-m", "flowerpot", "certs", "--client", "a"],
        env=clean_env(CERTS_DIR="certs"), cwd=tmp_path, capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: os.umask(0),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    keys = sorted((tmp_path / "certs").rglob("*.key"))
    assert len(keys) == 3 and all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    assert not list((tmp_path / "certs").rglob(".*.tmp"))


@pytest.mark.process
@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_owner_is_given_the_bundles_but_never_the_ca(tmp_path: Path) -> None:
    result = run_cli(["certs", "--client", "a", "--owner", "10001:10001"], cwd=tmp_path, CERTS_DIR="certs")
    assert result.returncode == 0, result.stderr
    certs = tmp_path / "certs"
    for path in [certs / "server", *(certs / "server").rglob("*"), certs / "clients", *(certs / "clients").rglob("*")]:
        assert (path.stat().st_uid, path.stat().st_gid) == (10001, 10001), path
    for path in [certs / "ca", *(certs / "ca").rglob("*")]:
        assert path.stat().st_uid == certs.stat().st_uid != 10001, path


@pytest.mark.process
def test_the_ca_key_can_be_encrypted_with_a_passphrase(tmp_path: Path) -> None:
    made = run_cli(["certs", "--client", "a"], cwd=tmp_path, CERTS_DIR="certs", CA_PASSPHRASE="correct horse")
    assert made.returncode == 0, made.stderr
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "certs" / "ca" / "ca.key").read_bytes()
    before = sorted((tmp_path / "certs").rglob("*"))
    for env, message in (
        ({}, "ca.key is encrypted: set CA_PASSPHRASE to its passphrase"),
        ({"CA_PASSPHRASE": "wrong"}, "CA_PASSPHRASE does not decrypt"),
    ):
        refused = run_cli(["certs", "--client", "b"], cwd=tmp_path, CERTS_DIR="certs", **env)
        assert refused.returncode == 2, refused.stderr
        errors = [line for line in refused.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in refused.stderr
    assert sorted((tmp_path / "certs").rglob("*")) == before  # nothing written
    again = run_cli(["certs", "--client", "b"], cwd=tmp_path, CERTS_DIR="certs", CA_PASSPHRASE="correct horse")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "certs" / "clients" / "b" / "client.pem").is_file()


@pytest.mark.process
def test_an_internationalized_host_name_is_encoded_for_the_certificate(tmp_path: Path) -> None:
    made = run_cli(["certs"], cwd=tmp_path, CERTS_DIR="certs", CERT_HOSTS="bücher.example, 203.0.113.10")
    assert made.returncode == 0, made.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server" / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "xn--bcher-kva.example" in names.get_values_for_type(x509.DNSName)


@pytest.mark.process
@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--owner", "99999999999:1"], {}, "--owner '99999999999:1': use UID:GID with numbers from 0 to"),
        (["--owner=-5:-5"], {}, "--owner '-5:-5': use UID:GID"),
        ([], {"CERT_HOSTS": "my host.example"}, "CERT_HOSTS='my host.example' is not valid"),
        ([], {"CERT_HOSTS": "a..b"}, "CERT_HOSTS='a..b' is not valid"),
        (["--client", "../x"], {}, "client name '../x' cannot name a certificate"),
    ],
    ids=["owner-too-big", "owner-negative", "host-with-space", "host-empty-label", "client-name-path"],
)
def test_bad_certs_inputs_are_refused_before_any_file_is_written(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    result = run_cli(["certs", "--client", "a", *args], cwd=tmp_path, CERTS_DIR="certs", **env)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not (tmp_path / "certs").exists()


def test_certs_are_ignored_by_git_and_docker() -> None:
    from conftest import REPO

    assert "/certs/*" in (REPO / ".gitignore").read_text().splitlines()
    assert "!flowerpot/" in (REPO / ".dockerignore").read_text()  # only code enters the images


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_tls_run_with_client_certificates_completes(
    spawn, data_dir: Path, tmp_path: Path, certs: Path, mode: str
) -> None:
    """Mutual TLS end to end, in both modes; two replicas of one site share client-2's certificate."""
    env = {**tls_env(data_dir, tmp_path, free_address()), "MODE": mode}
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    assert "(TLS, client certificates required)" in server.output
    clients = [spawn(["client"], **env, CLIENT_NAME=name) for name in ("client-1", "client-2", "client-2")]
    assert server.wait() == 0, server.output
    assert [c.wait() for c in clients] == [0, 0, 0]
    joined = [line for line in server.output.splitlines() if "(certificate, serial" in line and "joined" in line]
    assert [sum(f"client {name} (" in line for line in joined) for name in ("client-1", "client-2")] == [1, 2]


def test_a_plaintext_client_is_told_the_server_requires_tls(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    env = tls_env(data_dir, tmp_path, free_address())
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    client = spawn(["client"], **{**env, "TLS_ENABLED": "false", "CLIENT_AUTH": "none"})
    assert client.wait(60) == 4
    assert "accepts connections but the plaintext gRPC handshake failed" in client.output
    assert "the server requires TLS; set TLS_ENABLED=true" in client.output
    assert "not reachable" not in client.output.split("error:")[-1]


def test_a_client_that_trusts_another_ca_fails_the_handshake(
    spawn, data_dir: Path, tmp_path: Path, certs: Path
) -> None:
    env = tls_env(data_dir, tmp_path, free_address())
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    elsewhere = tmp_path / "elsewhere"
    assert run_cli(["certs", "--client", "client-1"], cwd=tmp_path, CERTS_DIR=str(elsewhere)).returncode == 0
    client = spawn(["client"], **{**env, "CERTS_DIR": str(elsewhere), "CLIENT_NAME": "client-1"})
    assert client.wait(60) == 4
    error = next(line for line in client.output.splitlines() if line.startswith("flowerpot client: error:"))
    assert "TLS handshake with the server at localhost:" in error
    # the reason given is gRPC's own about the server's certificate, not a bare status word
    reason = re.search(r"failed \(([^)]*)\)", error)
    assert reason is not None and "certificate" in reason.group(1).lower(), error
    assert "this client does not trust the server's certificate" in client.output


def refused(spawn, env: dict[str, str], client_env: dict[str, str]) -> tuple[str, str]:
    """Start a server and one client that it should refuse after the handshake, by name and
    reason; (client output, server output)."""
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    client = spawn(["client"], **{**env, **client_env})
    assert client.wait(60) == 4, client.output
    assert "Traceback" not in client.output
    server.wait_for("refused client")
    return client.output, server.output


def refused_by_tls(spawn, env: dict[str, str], client_env: dict[str, str]) -> str:
    """Start a server and one client whose certificate TLS itself turns away: the client exits 4
    with the likely causes, the server never admits it. The client's output."""
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    client = spawn(["client"], **{**env, **client_env})
    assert client.wait(90) == 4, client.output
    assert "Traceback" not in client.output
    errors = [line for line in client.output.splitlines() if "flowerpot client: error:" in line]
    assert len(errors) == 1 and "TLS handshake with the server at localhost:" in errors[0], client.output
    assert "joined" not in server.output
    # gRPC reports the refusal only on its own stderr; the server turns it into a line of its log
    server.wait_for("a TLS handshake failed, the connection is refused: ")
    assert not re.search(r"^I\d{4} ", server.output, re.M), server.output  # gRPC's other INFO lines: dropped
    return errors[0]


def test_a_client_without_a_certificate_is_refused(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    env = tls_env(data_dir, tmp_path, free_address())
    error = refused_by_tls(spawn, env, {"CLIENT_AUTH": "none", "CLIENT_NAME": "client-1"})
    assert "the server requires a client certificate (CLIENT_AUTH=certificate) and this client presents none" in error


def test_a_certificate_from_a_foreign_ca_is_refused(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    foreign_ca = new_ca(name="Someone Else's CA")
    write_credential(
        certs / "clients" / "mallory", "client", issue(foreign_ca, "mallory", client=True), load_ca(certs / "ca").cert
    )
    env = tls_env(data_dir, tmp_path, free_address())
    error = refused_by_tls(spawn, env, {"CLIENT_NAME": "mallory"})
    assert "this client's certificate was not issued by the CA in its ca.pem" in error


def test_an_expired_certificate_is_refused(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    ca = load_ca(certs / "ca")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    write_credential(
        certs / "clients" / "old", "client", issue(ca, "old", client=True, days=10, not_before=long_ago), ca.cert
    )
    env = tls_env(data_dir, tmp_path, free_address())
    error = refused_by_tls(spawn, env, {"CLIENT_NAME": "old"})
    assert "this client's certificate expired on" in error


def test_a_revoked_certificate_is_refused_at_its_next_join(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    """Revoked while the server runs: the list is read at every join, no restart needed."""
    env = tls_env(data_dir, tmp_path, free_address())
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    first = spawn(["client"], **env, CLIENT_NAME="client-1")
    server.wait_for("client client-1 .* joined")
    revoked = run_cli(["certs", "--revoke", "client-3"], cwd=tmp_path, CERTS_DIR="certs")
    assert revoked.returncode == 0, revoked.stderr
    serial = x509.load_pem_x509_certificate((certs / "clients" / "client-3" / "client.pem").read_bytes()).serial_number
    assert f"{serial:x}" in revoked.stdout and (certs / "server" / "revoked.json").is_file()
    client = spawn(["client"], **env, CLIENT_NAME="client-3")
    assert client.wait(60) == 4, client.output
    assert f"refused this client: this client's certificate (serial {serial:x}) was revoked on" in client.output
    server.wait_for("refused client client-3 \\(certificate, serial")
    assert first.returncode is None  # the others stay


@pytest.mark.process
def test_a_revoked_name_can_get_a_new_certificate(tmp_path: Path, certs: Path) -> None:
    """Rotation: revoke, then renew; the new serial is not on the list."""
    assert run_cli(["certs", "--revoke", "client-1"], cwd=tmp_path, CERTS_DIR="certs").returncode == 0
    renewed = run_cli(["certs", "--renew", "--client", "client-1"], cwd=tmp_path, CERTS_DIR="certs")
    assert renewed.returncode == 0, renewed.stderr
    from shared.revocation import read_revoked

    serial = x509.load_pem_x509_certificate((certs / "clients" / "client-1" / "client.pem").read_bytes()).serial_number
    revoked = read_revoked(certs / "server" / "revoked.json")
    assert len(revoked) == 1 and f"{serial:x}" not in revoked
    unknown = run_cli(["certs", "--revoke", "nobody"], cwd=tmp_path, CERTS_DIR="certs")
    assert unknown.returncode == 2 and "--revoke nobody: no certificate issued to 'nobody'" in unknown.stderr


def test_a_certificate_without_its_key_proves_nothing(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    """client-2's certificate with another key of the same CA: the pair is refused before connecting."""
    shutil.copy(certs / "clients" / "client-2" / "client.pem", certs / "clients" / "client-3" / "client.pem")
    env = tls_env(data_dir, tmp_path, free_address())
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    client = spawn(["client"], **{**env, "CLIENT_NAME": "client-3"})
    assert client.wait(60) == 2  # caught before connecting: the pair does not match
    assert "client.key is not the key of" in client.output


def _join(address: str, credentials: grpc.ChannelCredentials, metadata: tuple = ()) -> str:
    """One Join stream with these credentials: 'admitted', or the gRPC error's code."""
    from flwr.proto.transport_pb2_grpc import FlowerServiceStub

    with grpc.secure_channel(address, credentials) as channel:
        try:
            for _ in FlowerServiceStub(channel).Join(iter(()), metadata=metadata, timeout=5):
                return "admitted"
        except grpc.RpcError as err:
            return err.code().name
    return "closed"


def test_a_copied_certificate_or_proof_cannot_be_replayed(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    """The old join proof was metadata anyone could copy. With mutual TLS the certificate must
    be presented with its key inside the handshake: a thief with the PEM but another key, or one
    replaying the old proof's metadata, never gets a stream."""
    env = tls_env(data_dir, tmp_path, address := free_address())
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    dial = address.replace("127.0.0.1", "localhost")
    ca_pem = (certs / "ca" / "ca.pem").read_bytes()
    stolen_pem = (certs / "clients" / "client-1" / "client.pem").read_bytes()
    thief = issue(load_ca(certs / "ca"), "thief", client=True, days=1)  # another key (even one of our CA)
    attempts = [
        grpc.ssl_channel_credentials(ca_pem, key_pem(thief.key), stolen_pem),  # the PEM without its key
        grpc.ssl_channel_credentials(ca_pem, key_pem(new_ca().key), stolen_pem),
    ]
    assert [_join(dial, c) for c in attempts] == ["UNAVAILABLE", "UNAVAILABLE"]
    replay = (("flowerpot-cert-bin", stolen_pem), ("flowerpot-time", dt.datetime.now(dt.UTC).isoformat()),
              ("flowerpot-signature", "00" * 64), ("flowerpot-client", "client-1"))  # fmt: skip
    assert [_join(dial, grpc.ssl_channel_credentials(ca_pem), replay) for _ in range(3)] == ["UNAVAILABLE"] * 3
    assert "joined" not in server.output
    client = spawn(["client"], **env, CLIENT_NAME="client-1")  # the real site still gets in
    server.wait_for("client client-1 \\(certificate, serial .* joined")
    assert client.returncode is None


def test_connections_per_certificate_can_be_bounded(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    env = tls_env(data_dir, tmp_path, free_address(), MAX_CONNECTIONS_PER_CLIENT="1")
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    spawn(["client"], **env, CLIENT_NAME="client-1")
    server.wait_for("client client-1 .* joined")
    second = spawn(["client"], **env, CLIENT_NAME="client-1")
    assert second.wait(60) == 4, second.output
    assert "client 'client-1' already holds MAX_CONNECTIONS_PER_CLIENT=1 connection(s)" in second.output
    other = spawn(["client"], **env, CLIENT_NAME="client-2")  # another name is not affected
    server.wait_for("client client-2 .* joined")
    assert other.returncode is None


def _sign_and_install(site: Path, ca_certs: Path, csr_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    """At the CA: sign the request; back at the site: the certificate and the CA's ca.pem."""
    shutil.copy(csr_path, ca_certs.parent / csr_path.name)
    signed = run_cli(["certs", "--sign", csr_path.name], cwd=ca_certs.parent, CERTS_DIR="certs")
    if signed.returncode == 0:
        folder = site / "certs" / "clients" / name
        shutil.copy(ca_certs.parent / f"{name}.pem", folder / "client.pem")
        shutil.copy(ca_certs / "ca" / "ca.pem", folder / "ca.pem")
    return signed


def test_a_site_requests_and_the_ca_signs_and_the_key_never_travels(
    spawn, data_dir: Path, tmp_path: Path, certs: Path
) -> None:
    site = tmp_path / "site-a"
    site.mkdir()
    asked = run_cli(["certs", "--request", "site-a"], cwd=site, CERTS_DIR="certs")
    assert asked.returncode == 0, asked.stderr
    key = site / "certs" / "clients" / "site-a" / "client.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and not (site / "certs" / "ca").exists()
    csr = site / "certs" / "requests" / "site-a.csr"
    assert str(csr.relative_to(site)) in asked.stdout
    signed = _sign_and_install(site, certs, csr, "site-a")
    assert signed.returncode == 0, signed.stderr
    assert "site-a.pem" in signed.stdout
    assert not list(certs.rglob("*site-a*.key")) and not (certs / "clients" / "site-a").exists()
    env = tls_env(data_dir, tmp_path, free_address())
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    spawn(["client"], **{**env, "CERTS_DIR": str(site / "certs"), "CLIENT_NAME": "site-a"})
    server.wait_for("client site-a \\(certificate, serial .* joined")
    revoked = run_cli(["certs", "--revoke", "site-a"], cwd=tmp_path, CERTS_DIR="certs")  # known from ca/issued.json
    assert revoked.returncode == 0, revoked.stderr


def test_a_ca_issued_rsa_client_certificate_joins(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    """A site that makes its own RSA key and request (e.g. with openssl) is supported."""
    site = tmp_path / "rsa-site"
    folder = site / "certs" / "clients" / "rsa-site"
    folder.mkdir(parents=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (folder / "client.key").write_bytes(key_pem(key))
    request = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa-site")])
    )
    csr = site / "rsa-site.csr"
    csr.write_bytes(request.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    assert _sign_and_install(site, certs, csr, "rsa-site").returncode == 0
    env = tls_env(data_dir, tmp_path, free_address())
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    spawn(["client"], **{**env, "CERTS_DIR": str(site / "certs"), "CLIENT_NAME": "rsa-site"})
    server.wait_for("client rsa-site \\(certificate, serial .* joined")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    small = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")])
    )
    (site / "weak.csr").write_bytes(small.sign(weak, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    refused_weak = _sign_and_install(site, certs, site / "weak.csr", "weak")
    assert refused_weak.returncode == 2 and "use an EC P-256 key or RSA of 2048 bits" in refused_weak.stderr


@pytest.mark.parametrize("client_auth", ["none", "certificate"])
def test_a_plain_flower_client_joins_a_tls_server_only_without_client_auth(
    spawn, tmp_path: Path, certs: Path, client_auth: str
) -> None:
    """Flower's start_client cannot present a client certificate."""
    address = free_address()
    env = {
        **tls_env(tmp_path / "no-data", tmp_path, address, CLIENT_AUTH=client_auth),
        "MIN_AVAILABLE_CLIENTS": "1", "MIN_FIT_CLIENTS": "1", "MIN_EVALUATE_CLIENTS": "1", "NUM_ROUNDS": "1",
    }  # fmt: skip
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    plain = subprocess.Popen(
        [sys.executable, str(PLAIN_CLIENT), env["SERVER_ADDRESS"], "--ca", str(certs / "ca" / "ca.pem")],
        env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        if client_auth == "none":
            assert plain.wait(120) == 0
            assert server.wait() == 0, server.output
        else:
            time.sleep(8)
            assert "joined" not in server.output
    finally:
        plain.kill()
        plain.wait()


def test_require_tls_can_be_overridden_only_explicitly(spawn, tmp_path: Path) -> None:
    env = {**BASE_ENV, "RESULTS_DIR": str(tmp_path / "results"), "SERVER_LISTEN_ADDRESS": free_address()}
    refused_start = run_cli(["server"], cwd=tmp_path, **env, REQUIRE_TLS="true")
    assert refused_start.returncode == 2
    assert "REQUIRE_TLS=true but the server would run without TLS_ENABLED=true and CLIENT_AUTH=certificate" in (
        refused_start.stderr
    )
    assert "`flowerpot certs --client NAME`" in refused_start.stderr
    server = spawn(["server"], **env, REQUIRE_TLS="true", ALLOW_INSECURE="true")
    server.wait_for("listening on")
    assert "REQUIRE_TLS=true, but ALLOW_INSECURE=true: running without TLS_ENABLED=true" in server.output


def test_the_allow_list_is_honoured(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    env = tls_env(data_dir, tmp_path, free_address(), ALLOWED_CLIENTS="client-1,client-2", MIN_AVAILABLE_CLIENTS="2")
    client_out, server_out = refused(spawn, env, {"CLIENT_NAME": "client-3"})
    assert "refused this client: client 'client-3' is not on the server's allow-list (ALLOWED_CLIENTS)" in client_out
    assert "refused client client-3 (certificate, serial" in server_out


def test_the_allow_list_without_authentication_uses_the_given_names(spawn, data_dir: Path, tmp_path: Path) -> None:
    env = {
        **BASE_ENV, "DATA_DIR": str(data_dir), "RESULTS_DIR": str(tmp_path / "results"),
        "SERVER_LISTEN_ADDRESS": (address := free_address()), "SERVER_ADDRESS": address,
        "ALLOWED_CLIENTS": "alice", "MIN_AVAILABLE_CLIENTS": "1", "MIN_FIT_CLIENTS": "1", "MIN_EVALUATE_CLIENTS": "1",
        "NUM_ROUNDS": "2",
    }  # fmt: skip
    client_out, _ = refused(spawn, env, {"CLIENT_NAME": "bob"})
    assert "client 'bob' is not on the server's allow-list" in client_out
    alice = spawn(["client"], **env, CLIENT_NAME="alice")
    assert alice.wait(60) == 0
