"""One participant, one say: what an authenticated participant (a client certificate) can do to
the others with its seats, its votes and its shard claims, as real processes over mutual TLS on
loopback (certificates made by flowerpot/certs.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_security import tls_env

from conftest import REPO, free_address, run_cli
from flowerpot.launcher import clean_env

ATTACKER = REPO / "tests" / "cert_attacker.py"


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    result = run_cli(
        ["certs", "--client", "site-a", "--client", "site-b", "--client", "mallory"], cwd=tmp_path, CERTS_DIR="certs"
    )
    assert result.returncode == 0, result.stderr
    return tmp_path / "certs"


class Attacker:
    """COUNT streams of one certificate (tests/cert_attacker.py); its output once it is done."""

    def __init__(self, address: str, certs: Path, behaviour: str, count: int, name: str = "mallory") -> None:
        self.popen = subprocess.Popen(
            [sys.executable, str(ATTACKER), address, str(certs), name, behaviour, str(count)],
            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def stop(self) -> str:
        self.popen.kill()
        return self.popen.communicate(timeout=30)[0]


@pytest.fixture
def attacker():
    made: list[Attacker] = []

    def start(*args, **kwargs) -> Attacker:
        made.append(Attacker(*args, **kwargs))
        return made[-1]

    yield start
    for one in made:
        one.stop()


def dial(env: dict[str, str]) -> str:
    return env["SERVER_ADDRESS"]


def test_idle_streams_of_one_certificate_cannot_fill_the_server(
    spawn, attacker, data_dir: Path, tmp_path: Path, certs: Path
) -> None:
    """Ten idle streams on one certificate used to take all of MAX_CLIENTS=10 places: the honest
    sites were told the server is full. Now the certificate holds MAX_CONNECTIONS_PER_CLIENT (4 by
    default) seats, and those that never answer lose them in the vote on the starting weights."""
    env = tls_env(data_dir, tmp_path, free_address(), MIN_AVAILABLE_CLIENTS="2", NUM_ROUNDS="2", ROUND_TIMEOUT="15")
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    idle = attacker(dial(env), certs, "idle", 10)
    server.wait_for("client mallory .* joined \\(4 connected\\)")
    honest = [spawn(["client"], **env, CLIENT_NAME=name) for name in ("site-a", "site-b")]
    assert server.wait(240) == 0, server.output
    assert [c.wait(60) for c in honest] == [0, 0], [c.output for c in honest]
    assert "MAX_CONNECTIONS_PER_CLIENT=4" in idle.stop()
    assert "refused client mallory in the vote on the initial parameters: it sent no usable initial" in server.output


def test_one_certificate_has_one_vote_on_the_starting_weights(
    spawn, attacker, data_dir: Path, tmp_path: Path, certs: Path
) -> None:
    """Three connections on one certificate sending 1e30 starting weights used to outvote two
    honest sites (who were then refused and blamed). Every certificate has one vote."""
    env = tls_env(
        data_dir, tmp_path, free_address(), MIN_AVAILABLE_CLIENTS="5", NUM_ROUNDS="2", MAX_CONNECTIONS_PER_CLIENT="3"
    )
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    huge = attacker(dial(env), certs, "huge", 3)
    server.wait_for("client mallory .* joined \\(3 connected\\)")
    honest = [spawn(["client"], **env, CLIENT_NAME=name) for name in ("site-a", "site-b")]
    assert server.wait(240) == 0, server.output
    assert [c.wait(60) for c in honest] == [0, 0], [c.output for c in honest]
    assert "initial parameters agreed by 2 clients of 2 participant(s)" in server.output
    refusals = [line for line in server.output.splitlines() if "in the vote on the initial parameters" in line]
    assert len(refusals) == 3 and all("client mallory" in line for line in refusals), refusals
    assert "agreeing participant(s) (site-a, site-b)" in refusals[0]
    assert huge.stop().count("refused: PERMISSION_DENIED") == 3


def test_a_silent_client_is_dropped_from_the_vote_and_a_single_site_still_starts(
    spawn, attacker, data_dir: Path, tmp_path: Path, certs: Path
) -> None:
    """With one seat per certificate, one idle client in the vote used to end the run with exit 6
    ("the first 1 clients disagree"): it is dropped, named, and the one site that answered starts."""
    env = tls_env(
        data_dir, tmp_path, free_address(), MAX_CONNECTIONS_PER_CLIENT="1", ROUND_TIMEOUT="15", NUM_ROUNDS="2",
        MIN_AVAILABLE_CLIENTS="2", MIN_FIT_CLIENTS="1", MIN_EVALUATE_CLIENTS="1",
    )  # fmt: skip
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    attacker(dial(env), certs, "idle", 1)
    server.wait_for("client mallory .* joined")
    honest = spawn(["client"], **env, CLIENT_NAME="site-a")
    assert server.wait(240) == 0, server.output
    assert honest.wait(60) == 0, honest.output
    assert "refused client mallory in the vote on the initial parameters: it sent no usable" in server.output
    assert "initial parameters from the only client that answered, site-a" in server.output


def test_many_failing_connections_of_one_certificate_count_as_one_participant(
    spawn, attacker, data_dir: Path, tmp_path: Path, certs: Path
) -> None:
    """Four connections of one certificate sending unusable updates made every round fail
    MIN_COMPLETION_RATE against two honest sites; completion now counts certificates. Thirty
    rounds: the attacker joins after the vote, and three rounds could be over before it does."""
    env = tls_env(
        data_dir, tmp_path, free_address(), MIN_AVAILABLE_CLIENTS="2", NUM_ROUNDS="30", MAX_CONNECTIONS_PER_CLIENT="4"
    )
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    honest = [spawn(["client"], **env, CLIENT_NAME=name) for name in ("site-a", "site-b")]
    server.wait_for("initial parameters agreed")
    attacker(dial(env), certs, "huge", 4)  # after the vote: they take part in the rounds only
    server.wait_for("client mallory .* joined \\(6 connected\\)")
    assert server.wait(240) == 0, server.output
    assert [c.wait(60) for c in honest] == [0, 0], [c.output for c in honest]
    assert "refused the update of client mallory" in server.output
    assert " failed, its result is not applied" not in server.output


def test_a_duplicate_of_a_live_site_is_refused_and_does_not_push_it_out(spawn, data_dir: Path, tmp_path: Path) -> None:
    """A second process with a copy of site vm's shard 0 used to replace vm's healthy, training
    connection ("it replaces the old connection"); it is now refused, naming the live client."""
    import shutil

    from conftest import federation_env

    copy = tmp_path / "c"
    shutil.copytree(data_dir, copy)
    env = federation_env(
        data_dir, tmp_path, free_address(), MIN_AVAILABLE_CLIENTS="1", MIN_FIT_CLIENTS="1", MIN_EVALUATE_CLIENTS="1",
        NUM_ROUNDS="100000", KEEPALIVE_SECONDS="5", SITE_NAME="vm", SITE_SHARDS="0", LOCAL_EPOCHS="1",
    )  # fmt: skip
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    site = spawn(["client"], **env)
    server.wait_for("round 2/100000")
    duplicate = spawn(["client"], **{**env, "DATA_DIR": str(copy)})
    assert duplicate.wait(120) == 4, duplicate.output + server.output
    assert "shard shard_000 of site vm is trained by client client (" in duplicate.output
    assert "whose connection is alive" in duplicate.output
    assert "replaces the old connection" not in server.output
    rounds = server.output.count(" trained, ")
    server.wait_for(f"round {rounds + 3}/100000")  # the site trains on
    assert site.returncode is None and server.returncode is None


def test_a_certificate_cannot_claim_a_shard_the_operator_gave_another(
    spawn, data_dir: Path, tmp_path: Path, certs: Path
) -> None:
    """Without SHARD_OWNERS the first certificate to claim a shard holds it (every site with the
    same SEED and NUM_SHARDS can compute the built-in shards); with it, a claim outside a
    certificate's own shards is refused however early it comes, and the owner gets in."""
    env = tls_env(
        data_dir,
        tmp_path,
        free_address(),
        SHARD_OWNERS="site-a:0 mallory:1",
        MIN_AVAILABLE_CLIENTS="1",
        MIN_FIT_CLIENTS="1",
        MIN_EVALUATE_CLIENTS="1",
    )
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    squatter = spawn(["client"], **env, CLIENT_NAME="mallory", SITE_NAME="site-a", SITE_SHARDS="0")
    assert squatter.wait(60) == 4, squatter.output
    assert "certificate mallory claims shard shard_000, but the server's SHARD_OWNERS gives it shards 1" in (
        squatter.output
    )
    server.wait_for("refused client mallory \\(certificate")
    spawn(["client"], **env, CLIENT_NAME="site-a", SITE_SHARDS="0")
    server.wait_for("client site-a \\(certificate, serial .* joined")


def test_a_revocation_list_deleted_during_a_run_is_not_read_as_nothing_revoked(
    spawn, data_dir: Path, tmp_path: Path, certs: Path
) -> None:
    assert run_cli(["certs", "--revoke", "mallory"], cwd=tmp_path, CERTS_DIR="certs").returncode == 0
    env = tls_env(data_dir, tmp_path, free_address())
    server = spawn(["server"], **env)
    server.wait_for("revocation list .* 1 revoked certificate")
    (certs / "server" / "revoked.json").unlink()
    client = spawn(["client"], **env, CLIENT_NAME="mallory")
    assert client.wait(60) == 4, client.output
    assert "was revoked on" in client.output
    assert "revoked.json disappeared: keeping the last one read (1 revoked certificate(s))" in server.output


def test_revoking_a_connected_client_evicts_it_within_the_bound(
    spawn, data_dir: Path, tmp_path: Path, certs: Path
) -> None:
    """How an operator evicts a participant mid-run: `flowerpot certs --revoke NAME`."""
    env = tls_env(
        data_dir, tmp_path, free_address(), MIN_AVAILABLE_CLIENTS="2", MIN_FIT_CLIENTS="1", MIN_EVALUATE_CLIENTS="1",
        NUM_ROUNDS="100000",
    )  # fmt: skip
    server = spawn(["server"], **env)
    server.wait_for("listening on")
    clients = [spawn(["client"], **env, CLIENT_NAME=name) for name in ("site-a", "mallory")]
    server.wait_for("round 1/100000")
    assert run_cli(["certs", "--revoke", "mallory"], cwd=tmp_path, CERTS_DIR="certs").returncode == 0
    server.wait_for("evicted client mallory: this client's certificate .* was revoked", timeout=60)
    assert clients[1].wait(90) == 4, clients[1].output
    assert "was revoked on" in clients[1].output
    assert clients[0].returncode is None


def test_a_connection_that_never_finishes_its_handshake_is_closed(
    spawn, data_dir: Path, tmp_path: Path, certs: Path
) -> None:
    """Idle sockets of someone without a certificate held a file descriptor each for gRPC's
    default 120 s, enough of them lock every honest site out; the server now closes a
    connection that has not finished its TLS handshake within HANDSHAKE_SECONDS (10 s)."""
    import socket

    address = free_address()
    server = spawn(["server"], **tls_env(data_dir, tmp_path, address))
    server.wait_for("listening on")
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=90) as idle:
        assert idle.recv(1) == b""  # closed by the server, long before the 90 s (or 120 s) pass


def test_eleven_hundred_unauthenticated_sockets_do_not_lock_the_sites_out(
    spawn, data_dir: Path, tmp_path: Path, certs: Path
) -> None:
    """Reproduced: 1,100 idle sockets of someone without a certificate against a server under the
    usual 1,024 open-file limit; every honest site exited 4, told its certificate was "issued by
    another CA or expired", and the server exited 6. The server raises its soft limit to the hard
    one at start (and closes unfinished handshakes after HANDSHAKE_SECONDS)."""
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard open-file limit {hard} leaves no room to test above 1,024")
    env = tls_env(data_dir, tmp_path, free_address(), MIN_AVAILABLE_CLIENTS="2", NUM_ROUNDS="2")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # the server starts under the usual limit
    try:
        server = spawn(["server"], **env)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096) if hard == resource.RLIM_INFINITY
                                                     else min(hard, max(soft, 4096)), hard))  # fmt: skip
    server.wait_for("listening on")
    assert "open-file limit 1024:" not in server.output  # raised
    host, port = env["SERVER_LISTEN_ADDRESS"].rsplit(":", 1)
    idle = []
    try:
        for _ in range(1100):
            idle.append(socket.create_connection((host, int(port)), timeout=10))
        honest = [spawn(["client"], **env, CLIENT_NAME=name) for name in ("site-a", "site-b")]
        assert server.wait(240) == 0, server.output
        assert [c.wait(60) for c in honest] == [0, 0], [c.output for c in honest]
    finally:
        for sock in idle:
            sock.close()
