"""`flowerpot server`: bind the gRPC port, run the federation, stop cleanly."""

from __future__ import annotations

import logging

from server.reporting.live_metrics import LiveMetrics, metrics_host
from server.reporting.results import Results
from server.shutdown import stop_on_signal
from server.training.initial_weights import load_pinned
from server.training.rounds import Federation
from server.training.strategies import weak_strategy_warning
from server.training.update_checks import example_limit
from server.transport.admission import Admission, BoundedClientManager
from server.transport.sites import Sites
from server.transport.wiring import TlsFiles, Traffic, start_grpc_server
from shared.errors import BadInput
from shared.logs import tame_flower
from shared.revocation import REVOKED_FILE, RevocationList
from shared.settings import Settings
from shared.tls_files import bundle, check_pair, load_certificate, read_pem

log = logging.getLogger("flowerpot.server")


def run_server(settings: Settings) -> None:
    tame_flower(settings.log_level)
    require_secure(settings)
    if (weak := weak_strategy_warning(settings)) is not None:
        log.warning(weak)  # once, at start
    results = Results(settings.results_dir, settings.keep_all_models)  # fails fast when RESULTS_DIR is not writable
    results.hold()  # before any port: a second server on this folder says that a run is already going
    example_limit(settings)  # fails fast when the server cannot bound the clients' example counts
    if settings.initial_model is not None:
        load_pinned(settings.initial_model, settings.task_name)  # fails fast on an unusable INITIAL_MODEL
    client_manager = BoundedClientManager(wait_timeout=settings.rejoin_timeout, seed=settings.seed)
    admission = Admission(settings.max_clients, settings.allowed_client_names, settings.max_connections_per_client)
    tls, revocations = load_tls(settings)
    traffic = Traffic()
    sites = Sites(settings.class_names if settings.dataset == "folder" else (), settings.task_name)
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


def require_secure(settings: Settings) -> None:
    """REQUIRE_TLS (set where the port is published): no plaintext, no unauthenticated clients,
    unless the operator says ALLOW_INSECURE=true."""
    if not settings.require_tls:
        return
    missing = [
        text
        for ok, text in (
            (settings.tls_enabled, "TLS_ENABLED=true"),
            (settings.client_auth == "certificate", "CLIENT_AUTH=certificate"),
        )
        if not ok
    ]
    if missing and settings.allow_insecure:
        log.warning("REQUIRE_TLS=true, but ALLOW_INSECURE=true: running without %s", " and ".join(missing))
    elif missing:
        raise BadInput(
            f"REQUIRE_TLS=true but the server would run without {' and '.join(missing)}: make certificates with "
            "`flowerpot certs --client NAME` (docs/deployment.md: Deploy on EC2 with TLS) and set TLS_ENABLED=true and "
            "CLIENT_AUTH=certificate, or set ALLOW_INSECURE=true to accept the risk"
        )


def load_tls(settings: Settings) -> tuple[TlsFiles | None, RevocationList | None]:
    """The server's certificate and key (TLS_ENABLED); with CLIENT_AUTH=certificate also the CA
    that client certificates must come from and the list of revoked ones (read at every join)."""
    if not settings.tls_enabled:
        return None, None
    folder = bundle(settings.certs_dir, "server")
    certificate, private_key = read_pem(folder, "server.pem"), read_pem(folder, "server.key")
    check_pair(folder / "server.pem", certificate, private_key)
    if settings.client_auth == "none":
        return TlsFiles(certificate, private_key), None
    client_ca = read_pem(folder, "ca.pem")
    load_certificate(folder / "ca.pem", client_ca)
    return TlsFiles(certificate, private_key, client_ca), RevocationList(folder / REVOKED_FILE)
