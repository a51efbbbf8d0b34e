"""TLS and client authentication with real processes on loopback: who gets in, who is refused,
and what the server logs about them."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import stat
from pathlib import Path

import pytest

from conftest import BASE_ENV, free_address, run_cli
from shared.certs import issue, load_ca, new_ca, write_credential


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


def test_certs_command_writes_bundles_with_private_keys_kept_private(certs: Path) -> None:
    assert sorted(p.relative_to(certs).as_posix() for p in certs.rglob("*") if p.is_file()) == [
        "ca/ca.key", "ca/ca.pem",
        "clients/client-1/ca.pem", "clients/client-1/client.key", "clients/client-1/client.pem",
        "clients/client-2/ca.pem", "clients/client-2/client.key", "clients/client-2/client.pem",
        "clients/client-3/ca.pem", "clients/client-3/client.key", "clients/client-3/client.pem",
        "server/ca.pem", "server/server.key", "server/server.pem",
    ]  # fmt: skip
    for key in certs.rglob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = run_cli(["certs", "--client", "client-1"], cwd=certs.parent, CERTS_DIR="certs")
    assert again.returncode == 0 and "nothing to do" in again.stdout  # existing credentials are kept


def test_certs_are_ignored_by_git_and_docker() -> None:
    from conftest import REPO

    assert "/certs/*" in (REPO / ".gitignore").read_text().splitlines()
    assert "!flowerpot.py" in (REPO / ".dockerignore").read_text()  # only code enters the images


def test_a_tls_run_with_client_certificates_completes(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    env = tls_env(data_dir, tmp_path, free_address())
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    assert "(TLS, client certificates required)" in server.output
    clients = [spawn(["client"], **env, CLIENT_NAME=f"client-{i}") for i in (1, 2, 3)]
    assert server.wait() == 0, server.output
    assert [c.wait() for c in clients] == [0, 0, 0]
    for i in (1, 2, 3):
        assert f"client client-{i} (certificate," in server.output


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


def refused(spawn, env: dict[str, str], client_env: dict[str, str]) -> tuple[str, str]:
    """Start a server and one client that it should refuse; (client output, server output)."""
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    client = spawn(["client"], **{**env, **client_env})
    assert client.wait(60) == 4, client.output
    assert "Traceback" not in client.output
    server.wait_for("refused client")
    return client.output, server.output


def test_a_client_without_a_certificate_is_refused(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    env = tls_env(data_dir, tmp_path, free_address())
    client_out, server_out = refused(spawn, env, {"CLIENT_AUTH": "none", "CLIENT_NAME": "client-1"})
    assert "refused this client: no client certificate: this server requires one issued by its CA" in client_out
    assert "refused client (no certificate) from ipv4:127.0.0.1:" in server_out


def test_a_certificate_from_a_foreign_ca_is_refused(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    foreign_ca = new_ca(name="Someone Else's CA")
    write_credential(
        certs / "clients" / "mallory", "client", issue(foreign_ca, "mallory", client=True), load_ca(certs / "ca").cert
    )
    env = tls_env(data_dir, tmp_path, free_address())
    client_out, server_out = refused(spawn, env, {"CLIENT_NAME": "mallory"})
    assert "refused this client: the client certificate was not issued by this server's CA" in client_out
    assert "refused client mallory (certificate CN=mallory, serial" in server_out
    assert "not issued by this server's CA" in server_out


def test_an_expired_certificate_is_refused(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    ca = load_ca(certs / "ca")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    write_credential(
        certs / "clients" / "old", "client", issue(ca, "old", client=True, days=10, not_before=long_ago), ca.cert
    )
    env = tls_env(data_dir, tmp_path, free_address())
    client_out, server_out = refused(spawn, env, {"CLIENT_NAME": "old"})
    assert "refused this client: the client certificate expired on" in client_out
    assert "refused client old (certificate CN=old, serial" in server_out and "expired on" in server_out


def test_a_certificate_without_its_key_proves_nothing(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    """client-2's certificate with another key of the same CA: the proof does not verify."""
    shutil.copy(certs / "clients" / "client-2" / "client.pem", certs / "clients" / "client-3" / "client.pem")
    env = tls_env(data_dir, tmp_path, free_address())
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    client = spawn(["client"], **{**env, "CLIENT_NAME": "client-3"})
    assert client.wait(60) == 2  # caught before connecting: the pair does not match
    assert "client.key is not the key of" in client.output


def test_the_allow_list_is_honoured(spawn, data_dir: Path, tmp_path: Path, certs: Path) -> None:
    env = tls_env(data_dir, tmp_path, free_address(), ALLOWED_CLIENTS="client-1,client-2", MIN_AVAILABLE_CLIENTS="2")
    client_out, server_out = refused(spawn, env, {"CLIENT_NAME": "client-3"})
    assert "refused this client: client 'client-3' is not on the server's allow-list (ALLOWED_CLIENTS)" in client_out
    assert "refused client client-3 (certificate," in server_out


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
