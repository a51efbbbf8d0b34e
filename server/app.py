"""`flowerpot server`: bind the gRPC port, run the federation, stop cleanly."""

from __future__ import annotations

import contextlib
import logging
import resource
from pathlib import Path

from server.reporting.live_metrics import LiveMetrics, metrics_host
from server.reporting.results import Results
from server.shutdown import stop_on_signal
from server.training.client_privacy import ClientLevel, planned_line
from server.training.initial_weights import load_pinned
from server.training.rounds import Federation
from server.training.strategies import weak_strategy_warning
from server.training.update_checks import example_limit
from server.transport.admission import Admission, BoundedClientManager
from server.transport.handshake_log import relay_grpc_stderr
from server.transport.sites import Sites
from server.transport.wiring import TlsFiles, Traffic, start_grpc_server
from shared import logs
from shared.errors import BadInput
from shared.logs import tame_flower
from shared.revocation import REVOKED_FILE, RevocationList
from shared.settings import Settings
from shared.tls_files import bundle, check_pair, load_certificate, read_pem

log = logging.getLogger("flowerpot.server")

DEAD_SLACK_SECONDS = 5  # beyond 2 x KEEPALIVE_SECONDS, before a silent connection counts as alive
FILES_IN_USE = 64  # descriptors the server holds besides connections (logs, results, libraries)


def run_server(settings: Settings) -> None:
    tame_flower(settings.log_level)
    relay_grpc_stderr(drop_info=logs.GRPC_INFO_FOR_HANDSHAKES)  # refused handshakes, in this log
    require_secure(settings)
    if (weak := weak_strategy_warning(settings)) is not None:
        log.warning(weak)  # once, at start
    results = Results(settings.results_dir, settings.keep_all_models)  # fails fast when RESULTS_DIR is not writable
    results.hold()  # before any port: a second server on this folder says that a run is already going
    example_limit(settings)  # fails fast when the server cannot bound the clients' example counts
    if settings.initial_model is not None:
        load_pinned(settings.initial_model, settings.task_name)  # fails fast on an unusable INITIAL_MODEL
    if (client_level := ClientLevel.from_settings(settings)) is not None:  # fails fast over DP_EPSILON_BUDGET
        planned = client_level.check_budget(settings.num_rounds, settings.dp_epsilon_budget)
        log.info(planned_line(client_level, settings.num_rounds, planned))
    client_manager = BoundedClientManager(
        wait_timeout=settings.rejoin_timeout,
        seed=settings.seed,
        poisson_rate=settings.fraction_fit if settings.dp == "client" else None,
    )
    client_manager.busy_wait = settings.round_timeout  # a late fit ends by then: answered or timed out
    certified = settings.client_auth == "certificate"
    # Without client certificates a client names itself: a bound per name would stop nobody.
    per_certificate = settings.max_connections_per_client if certified else 0
    admission = Admission(settings.max_clients, settings.allowed_client_names, per_certificate)
    raise_open_file_limit(settings.max_clients)
    tls, revocations = load_tls(settings)
    traffic = Traffic()
    sites = Sites(
        settings.class_names if settings.dataset == "folder" else (),
        settings.task_name,
        settings.shard_owner_map,
        dead_within=2 * settings.keepalive_seconds + DEAD_SLACK_SECONDS,
    )
    live = LiveMetrics(settings.num_rounds, settings.metrics_linger)
    live.serve(metrics_host(settings.server_listen_address), settings.metrics_port)
    try:
        grpc_server = start_grpc_server(
            client_manager,
            admission,
            traffic,
            settings.server_listen_address,
            settings.max_message_bytes,
            tls,
            revocations,
            keepalive_seconds=settings.keepalive_seconds,
            sites=sites,
        )
        try:
            with stop_on_signal(grpc_server, client_manager):
                Federation(settings, client_manager, results, traffic, live, sites.run_metrics).run()
        finally:
            grpc_server.stop(grace=1)
    except (SystemExit, KeyboardInterrupt):  # stopped (SIGTERM, Ctrl-C): no lingering
        live.close(linger=False)
        raise
    finally:
        results.release()  # the run is over: a next server may start while the metrics linger
        live.close()  # after the gRPC port is free: serves the final values a little longer


def warn_if_shared(key: Path) -> None:
    """A private key that other users of the machine can read lets them pose as this server."""
    try:
        mode = key.stat().st_mode & 0o777
    except OSError:
        return  # read a moment ago: a vanished key is the next reader's error
    if mode & 0o077:
        log.warning(
            "%s is readable by other users (mode %03o): whoever reads it can pose as this server; "
            "`chmod 600 %s` (flowerpot certs writes it so)", key, mode, key,
        )  # fmt: skip


def require_secure(settings: Settings) -> None:
    """REQUIRE_TLS (set where the port is published): no plaintext, no unauthenticated clients,
    unless the operator says ALLOW_INSECURE=true. An allow-list without client certificates
    checks only the names clients give themselves: a warning, and refused under REQUIRE_TLS."""
    missing = (
        [
            text
            for ok, text in (
                (settings.tls_enabled, "TLS_ENABLED=true"),
                (settings.client_auth == "certificate", "CLIENT_AUTH=certificate"),
            )
            if not ok
        ]
        if settings.require_tls
        else []
    )
    if missing and not settings.allow_insecure:  # the first thing a published port needs
        raise BadInput(
            f"REQUIRE_TLS=true but the server would run without {' and '.join(missing)}: make certificates with "
            "`flowerpot certs --client NAME` (docs/deployment.md: Deploy on EC2 with TLS) and set TLS_ENABLED=true and "
            "CLIENT_AUTH=certificate, or set ALLOW_INSECURE=true to accept the risk"
        )
    if settings.allowed_client_names and settings.client_auth == "none":
        if settings.require_tls:
            raise BadInput(
                f"ALLOWED_CLIENTS={settings.allowed_clients} with CLIENT_AUTH=none checks only the names clients "
                "give themselves (anyone can claim one), and REQUIRE_TLS=true asks for authentication: set "
                "CLIENT_AUTH=certificate (the allow-list then names certificates), or empty ALLOWED_CLIENTS"
            )
        log.warning(
            "ALLOWED_CLIENTS with CLIENT_AUTH=none is not authentication: it checks only the names clients give "
            "themselves; use CLIENT_AUTH=certificate to know who joins"
        )
    if missing:
        log.warning("REQUIRE_TLS=true, but ALLOW_INSECURE=true: running without %s", " and ".join(missing))


def raise_open_file_limit(places: int) -> None:
    """Raise the soft open-file limit to the hard one and log the capacity: each connection,
    authenticated or still in its TLS handshake, costs a file descriptor, and a server out of
    them cannot even accept the sites it expects (they would be told their handshake failed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    log.info(
        "open-file limit %d: room for about %d connections (MAX_CLIENTS=%d places)",
        soft, max(0, soft - FILES_IN_USE), places,
    )  # fmt: skip
    if soft - FILES_IN_USE < 4 * places:
        log.warning(
            "the open-file limit %d leaves little room beyond MAX_CLIENTS=%d: raise it (ulimit -n, or the "
            "container's nofile limit)", soft, places,
        )  # fmt: skip


def load_tls(settings: Settings) -> tuple[TlsFiles | None, RevocationList | None]:
    """The server's certificate and key (TLS_ENABLED); with CLIENT_AUTH=certificate also the CA
    that client certificates must come from and the list of revoked ones (read at every join)."""
    if not settings.tls_enabled:
        return None, None
    folder = bundle(settings.certs_dir, "server")
    certificate, private_key = read_pem(folder, "server.pem"), read_pem(folder, "server.key")
    check_pair(folder / "server.pem", certificate, private_key)
    warn_if_shared(folder / "server.key")
    if settings.client_auth == "none":
        return TlsFiles(certificate, private_key), None
    client_ca = read_pem(folder, "ca.pem")
    load_certificate(folder / "ca.pem", client_ca)
    return TlsFiles(certificate, private_key, client_ca), RevocationList(folder / REVOKED_FILE)
