"""`flowerpot server`: bind the gRPC port, run the federation, stop cleanly."""

from __future__ import annotations

import logging

from cryptography import x509

from server.admission import Admission, BoundedClientManager
from server.initial_weights import load_pinned
from server.results import Results
from server.rounds import Federation
from server.update_checks import example_limit
from server.wiring import TlsFiles, Traffic, start_grpc_server
from shared.logs import tame_flower
from shared.settings import Settings
from shared.tls_files import bundle, check_pair, load_certificate, read_pem

log = logging.getLogger("flowerpot.server")


def run_server(settings: Settings) -> None:
    tame_flower(settings.log_level)
    results = Results(settings.results_dir)  # fails fast when RESULTS_DIR is not writable
    example_limit(settings)  # fails fast when the server cannot bound the clients' example counts
    if settings.initial_model is not None:
        load_pinned(settings.initial_model)  # fails fast on an unusable INITIAL_MODEL
    client_manager = BoundedClientManager(wait_timeout=settings.rejoin_timeout)
    admission = Admission(settings.max_clients, settings.allowed_client_names)
    tls, client_ca = load_tls(settings)
    traffic = Traffic()
    grpc_server = start_grpc_server(
        client_manager, admission, traffic, settings.server_listen_address, settings.max_message_bytes, tls, client_ca
    )
    try:
        Federation(settings, client_manager, results, traffic).run()
    finally:
        grpc_server.stop(grace=1)


def load_tls(settings: Settings) -> tuple[TlsFiles | None, x509.Certificate | None]:
    """The server's certificate and key (TLS_ENABLED), and the CA that client certificates must
    come from (CLIENT_AUTH=certificate)."""
    if not settings.tls_enabled:
        return None, None
    folder = bundle(settings.certs_dir, "server")
    tls = TlsFiles(certificate=read_pem(folder, "server.pem"), private_key=read_pem(folder, "server.key"))
    check_pair(folder / "server.pem", tls.certificate, tls.private_key)
    if settings.client_auth == "none":
        return tls, None
    return tls, load_certificate(folder / "ca.pem", read_pem(folder, "ca.pem"))
