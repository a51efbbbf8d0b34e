"""`flowerpot server`: bind the gRPC port, run the federation, stop cleanly."""

from __future__ import annotations

import logging

from server.admission import Admission, BoundedClientManager
from server.results import Results
from server.rounds import Federation
from server.wiring import start_grpc_server
from shared.logs import tame_flower
from shared.settings import Settings

log = logging.getLogger("flowerpot.server")


def run_server(settings: Settings) -> None:
    tame_flower(settings.log_level)
    results = Results(settings.results_dir)  # fails fast when RESULTS_DIR is not writable
    client_manager = BoundedClientManager(wait_timeout=settings.rejoin_timeout)
    admission = Admission(settings.max_clients, settings.allowed_client_names)
    grpc_server = start_grpc_server(
        client_manager, admission, settings.server_listen_address, settings.max_message_bytes
    )
    try:
        Federation(settings, client_manager, results).run()
    finally:
        grpc_server.stop(grace=1)
