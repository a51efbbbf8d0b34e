"""The Flowerpot client: a NumPyClient that trains the shared CNN on one claimed shard."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import numpy as np
import torch
from cryptography import x509
from flwr.compat.client.numpy_client import NumPyClient

from client import task, wiring
from client.claim import claim_shard
from client.data.images import ImageSpec
from client.data.shards import Shard, load_shard
from client.model import build_model, get_weights, set_weights
from client.shards_wait import wait_for_shards
from shared import protocol
from shared.errors import BadInput
from shared.logs import tame_flower
from shared.modelfile import FINAL_MODEL, save_model
from shared.protocol import join_value
from shared.settings import Settings
from shared.tls_files import bundle, check_pair, common_name, read_pem

log = logging.getLogger("flowerpot.client")


class FlowerpotClient(NumPyClient):
    """get_parameters / set_parameters / fit / evaluate, as in Flower's PyTorch tutorial."""

    def __init__(self, shard: Shard, settings: Settings, model_dir: Path) -> None:
        self.shard, self.settings, self.model_dir = shard, settings, model_dir
        self.model = build_model(shard.spec, settings.seed)

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return get_weights(self.model)

    def set_parameters(self, parameters: list[np.ndarray]) -> None:
        try:
            set_weights(self.model, parameters)
        except ValueError as exc:
            raise BadInput(
                f"the server's model does not fit this client's data set {self.shard.spec.dataset} ({exc}): "
                "run server and clients with the same DATASET, or start the server on a fresh RESULTS_DIR"
            ) from None

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        self.set_parameters(parameters)
        server_round = int(config.get(protocol.SERVER_ROUND, 0))
        started, cpu_started = time.perf_counter(), time.process_time()
        outcome = task.train(
            self.model,
            self.shard.x_train,
            self.shard.y_train,
            self.shard.spec,
            epochs=int(config.get(protocol.LOCAL_EPOCHS, self.settings.local_epochs)),
            batch_size=int(config.get(protocol.BATCH_SIZE, self.settings.batch_size)),
            lr=float(config.get(protocol.LEARNING_RATE, self.settings.learning_rate)),
            # Async mode numbers every fit (fit_id): two fits on one model version differ.
            seed=self.settings.seed * 100_003 + int(config.get(protocol.FIT_ID, server_round)),
            proximal_mu=float(config.get(protocol.PROXIMAL_MU, 0.0)),
        )
        slowdown = self.settings.client_slowdown
        if slowdown > 1:
            # CLIENT_SLOWDOWN, an emulated slow device: the fit takes this many times its training's
            # CPU time. CPU time, not wall time: processes sharing the machine's cores would
            # otherwise stretch each other's emulated devices as well.
            cpu = time.process_time() - cpu_started
            time.sleep(max(0.0, slowdown * cpu - (time.perf_counter() - started)))
        seconds = time.perf_counter() - started
        version = f" on version {config[protocol.MODEL_VERSION]}" if protocol.MODEL_VERSION in config else ""
        log.info(
            "round %s: trained%s on %d examples, loss %.4f, %.2f s",
            server_round or "?",
            version,
            outcome.examples,
            outcome.loss,
            seconds,
        )
        metrics = {
            protocol.TRAIN_LOSS: outcome.loss,
            protocol.TRAIN_ACCURACY: outcome.accuracy,
            protocol.TRAIN_SECONDS: seconds,
            protocol.SHARD: self.shard.name,
        }
        if float(config.get(protocol.PROXIMAL_MU, 0.0)) > 0:  # FedProx: its term on its own, not in train_loss
            metrics[protocol.TRAIN_PROXIMAL_TERM] = outcome.proximal
        return self.get_parameters({}), outcome.examples, metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        self.set_parameters(parameters)
        started = time.perf_counter()
        outcome = task.evaluate(self.model, self.shard.x_test, self.shard.y_test, self.shard.spec)
        seconds = time.perf_counter() - started
        server_round, num_rounds = int(config.get(protocol.SERVER_ROUND, 0)), int(config.get(protocol.NUM_ROUNDS, -1))
        log.info(
            "round %s: evaluated on %d examples, accuracy %.4f", server_round or "?", outcome.examples, outcome.accuracy
        )
        if server_round == num_rounds:
            self.keep_final_model(server_round, outcome)
        return (
            outcome.loss,
            outcome.examples,
            {protocol.ACCURACY: outcome.accuracy, protocol.EVAL_SECONDS: seconds, protocol.SHARD: self.shard.name},
        )

    def keep_final_model(self, server_round: int, outcome: task.Outcome) -> None:
        path = self.model_dir / FINAL_MODEL
        meta = {
            "round": server_round,
            "shard": self.shard.name,
            "spec": self.shard.spec.to_json(),
            "local_test_accuracy": outcome.accuracy,
            "local_test_examples": outcome.examples,
        }
        save_model(path, self.get_parameters({}), meta)
        log.info("kept the final global model in %s", path)


def run_client(settings: Settings) -> None:
    """Claim a shard, connect (with retries), train for the whole run, keep the final model."""
    tame_flower(settings.log_level)
    torch.set_num_threads(settings.torch_threads)
    wait_for_shards(settings.data_dir, settings.shards_timeout)
    site_shards = settings.site_shard_indices if settings.site_shards else None
    with claim_shard(settings.data_dir, settings.shard_id, site_shards) as folder:
        shard = load_shard(folder)
        log.info(
            "claimed %s of %s: %d train and %d test examples",
            shard.name,
            shard.spec.dataset,
            len(shard.y_train),
            len(shard.y_test),
        )
        model_dir = settings.results_dir / f"client_{shard.name}"
        client = FlowerpotClient(shard, settings, model_dir)
        endpoint = wiring.Endpoint(
            address=settings.server_address,
            name=settings.client_name,
            max_message_bytes=settings.max_message_bytes,
            connect_timeout=settings.connect_timeout,
            keepalive_seconds=settings.keepalive_seconds,
            join=join_value(site_name(settings), shard.name, shard.data_checksum, input_fingerprint(shard.spec)),
            **tls_options(settings),
        )
        wiring.run(client.to_client(), endpoint)
        log.info("the server ended the run; %s is released", shard.name)


def site_name(settings: Settings) -> str:
    """SITE_NAME, else the client certificate's name (CLIENT_AUTH=certificate), else the host
    name: what names this machine in the server's logs, history and metrics."""
    if settings.site_name:
        return settings.site_name
    if settings.client_auth == "certificate":  # the name the server knows it by: the certificate's
        own = bundle(settings.certs_dir, f"clients/{settings.client_name}")
        try:
            cert = x509.load_pem_x509_certificate(read_pem(own, "client.pem"))
            if name := common_name(cert.subject):
                return name
        except (BadInput, ValueError):  # tls_options says what is wrong with the file
            pass
        return settings.client_name
    return socket.gethostname()


def input_fingerprint(spec: ImageSpec) -> dict:
    """What defines this client's input: every client of a run must agree on all of it."""
    return {
        "dataset": spec.dataset,
        "classes": list(spec.classes),
        "image_size": f"{spec.height}x{spec.width}",
        "channels": spec.channels,
        "mean": list(spec.mean),
        "std": list(spec.std),
    }


def tls_options(settings: Settings) -> dict:
    """The server's CA (TLS_ENABLED), and this client's key and certificate for mutual TLS
    (CLIENT_AUTH=certificate)."""
    if not settings.tls_enabled:
        return {}
    own = bundle(settings.certs_dir, f"clients/{settings.client_name}")
    ca_folder = own if (own / "ca.pem").is_file() else settings.certs_dir / "ca"
    options: dict = {"root_certificates": read_pem(ca_folder, "ca.pem")}
    if settings.client_auth == "certificate":
        cert_pem, key_pem = read_pem(own, "client.pem"), read_pem(own, "client.key")
        # Dates are the server's to judge (its clock decides); a refusal names them (wiring).
        check_pair(own / "client.pem", cert_pem, key_pem, check_dates=False)
        options.update(private_key=key_pem, certificate_chain=cert_pem)
    return options
