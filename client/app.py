"""The Flowerpot client: a NumPyClient that trains the run's task (TASK) on one claimed shard."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import zlib
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography import x509
from flwr.compat.client.numpy_client import NumPyClient

from client import wiring
from client.claim import claim_shard
from client.data.images import ImageSpec
from client.data.shards import Shard, load_shard, no_validation_split
from client.fleet import run_fleet
from client.privacy.training import PrivateTraining
from client.secure_aggregation import Identity, Participant
from client.shards_wait import wait_for_shards
from client.tasks import (
    Config,
    Task,
    TaskFailed,
    get_weights,
    global_parameters,
    load_task,
    model_layout,
    set_weights,
    to_data,
)
from shared import protocol
from shared.errors import BadInput, RunIncomplete
from shared.logs import tame_flower
from shared.modelfile import FINAL_MODEL, save_model
from shared.protocol import join_value
from shared.secure_aggregation import ProtocolProblem
from shared.settings import Settings
from shared.tls_files import bundle, check_pair, common_name, read_pem

log = logging.getLogger("flowerpot.client")


_BUILDING = threading.Lock()


class FlowerpotClient(NumPyClient):
    """get_parameters / set_parameters / fit / evaluate, as in Flower's PyTorch tutorial."""

    def __init__(
        self,
        shard: Shard,
        settings: Settings,
        model_dir: Path | None,
        task: Task | None = None,
        slot: AbstractContextManager[Any] | None = None,
    ) -> None:
        # model_dir None: another logical client of this process keeps the final model's copy.
        # slot: held while training or evaluating, so that a process's logical clients take turns.
        self.shard, self.settings, self.model_dir = shard, settings, model_dir
        self.slot = slot or nullcontext()
        self.task = task or load_task(settings.task, settings.task_dir)
        # Checked before the client connects: a task that cannot build or run its model says so here.
        # One at a time: torch's seed is the process's, and every client of a run must start from
        # the same weights (the server compares them), also logical clients built side by side.
        with _BUILDING:
            self.model = self.task.check(shard.spec, settings.seed, settings.device)
        check_message_size(self.task, self.model, settings)
        self.privacy = (
            PrivateTraining.start(shard, settings, self.task, self.model) if settings.dp == "record" else None
        )
        self.secure = Participant(settings, signing_identity(settings), shard.name)

    def get_properties(self, config: dict) -> dict:
        if protocol.SECAGG_STAGE in config:
            return self.secure.answer(config)
        return {}

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return get_weights(self.model)

    def set_parameters(self, parameters: list[np.ndarray]) -> None:
        try:
            set_weights(self.model, parameters)
        except ValueError as exc:
            raise BadInput(
                f"the server's model does not fit this client's TASK={self.task.name} on data set "
                f"{self.shard.spec.dataset} ({exc}): run server and clients with the same TASK and DATASET, "
                "or start the server on a fresh RESULTS_DIR"
            ) from None

    def round_config(self, config: dict, fit: bool = False) -> Config:
        """What train and evaluate get: the server's knobs for the round, else this client's settings."""
        s, server_round = self.settings, int(config.get(protocol.SERVER_ROUND, 0))
        return Config(
            epochs=int(config.get(protocol.LOCAL_EPOCHS, s.local_epochs)),
            batch_size=int(config.get(protocol.BATCH_SIZE, s.batch_size)),
            learning_rate=float(config.get(protocol.LEARNING_RATE, s.learning_rate)),
            # Async mode numbers every fit (fit_id): two fits on one model version differ.
            seed=s.seed * 100_003 + int(config.get(protocol.FIT_ID, server_round)),
            round=server_round,
            proximal_mu=float(config.get(protocol.PROXIMAL_MU, 0.0)),
            global_weights=global_parameters(self.model) if fit else [],
            device=s.device,
            num_rounds=int(config.get(protocol.NUM_ROUNDS, s.num_rounds)),
        )

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        with self.slot:
            return self._fit(parameters, config)

    def _fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        secure = None
        if config.get(protocol.SECAGG_STAGE) == protocol.MASKED_INPUT:
            try:
                secure = self.secure.prepare_input(config)  # before training: a refused round costs none
            except ProtocolProblem as problem:
                log.warning(
                    "%s: secure aggregation, masked input: %s; this client leaves the round", step(config), problem
                )
                raise wiring.AnswerFailed(f"secure aggregation: {problem}") from None
        elif self.settings.secure_aggregation:
            log.warning("%s: the server asked for this client's update in the clear; refused", step(config))
            raise wiring.AnswerFailed(
                "this client runs SECURE_AGGREGATION=true and sends its update only masked: run the server "
                "with SECURE_AGGREGATION=true as well"
            )
        self.set_parameters(parameters)
        started, cpu_started = time.perf_counter(), time.process_time()
        run_config = self.round_config(config, fit=True)
        data = to_data(self.shard.x_train, self.shard.y_train, self.shard.spec, self.settings.device)
        private = self.privacy.plan(run_config, step(config)) if self.privacy is not None else None
        try:
            outcome = self.task.fit(self.model, data, run_config, private.loop if private is not None else None)
        except TaskFailed as exc:  # the task's own error: this fit fails, the client stays
            log.warning("%s: TASK=%s's train raised %s: the fit failed", step(config), self.task.name, exc)
            log.debug("the task's traceback", exc_info=exc.__cause__)
            raise wiring.AnswerFailed(f"TASK={self.task.name}'s train raised {exc}") from None
        slowdown = self.emulated_slowdown(run_config.seed)
        if slowdown > 1:
            # CLIENT_SLOWDOWN, an emulated slow device: the fit takes this many times its training's
            # CPU time. CPU time, not wall time: processes sharing the machine's cores would
            # otherwise stretch each other's emulated devices as well.
            cpu = time.process_time() - cpu_started
            time.sleep(max(0.0, slowdown * cpu - (time.perf_counter() - started)))
        seconds = time.perf_counter() - started
        log.info(
            "%s: trained on %d examples, loss %.4f, %.2f s",
            step(config),
            len(data),
            outcome["loss"],
            seconds,
        )
        # The task's names under the server's: train_loss, train_accuracy, train_proximal_term
        # (FedProx's term on its own, not in train_loss), train_<metric> for METRICS.
        metrics: dict = {f"train_{key}": value for key, value in outcome.items()}
        if private is not None and self.settings.dp_metrics == "withheld":
            metrics = {}  # computed on the private records, without noise: DP_METRICS=withheld keeps them here
        metrics.update({protocol.TRAIN_SECONDS: seconds, protocol.SHARD: self.shard.name})
        if private is not None and self.privacy is not None:
            metrics.update(self.privacy.spent(private, step(config)))  # on the ledger before the update leaves
        if secure is not None:
            delta = np.concatenate(
                [(new.astype(np.float64) - old.astype(np.float64)).ravel()
                 for new, old in zip(self.get_parameters({}), parameters)]
            )  # fmt: skip
            if not np.isfinite(delta).all():  # clipping would hide it in the sum: said, not sent
                log.warning("%s: the update holds NaN or Inf values; not sent", step(config))
                raise wiring.AnswerFailed(f"the update holds {protocol.NOT_FINITE} values")
            # The example count travels inside the masked input, as its weight: 0 here.
            return [self.secure.masked_input(secure, delta, len(data), run_config.seed)], 0, metrics
        return self.get_parameters({}), len(data), metrics

    def emulated_slowdown(self, fit_seed: int) -> float:
        """CLIENT_SLOWDOWN, times a log-normal factor per fit with CLIENT_SLOWDOWN_SPREAD: drawn
        from the fit's own seed and the shard, so that a run is repeatable and two clients differ."""
        s = self.settings
        if s.client_slowdown_spread == 0:
            return s.client_slowdown
        rng = np.random.default_rng([fit_seed, zlib.crc32(self.shard.name.encode())])
        return max(1.0, s.client_slowdown * math.exp(s.client_slowdown_spread * rng.standard_normal()))

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        with self.slot:
            return self._evaluate(parameters, config)

    def _evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        self.set_parameters(parameters)
        started = time.perf_counter()
        server_round, num_rounds = int(config.get(protocol.SERVER_ROUND, 0)), int(config.get(protocol.NUM_ROUNDS, -1))
        x, y = self.evaluation_split(config)
        data = to_data(x, y, self.shard.spec, self.settings.device)
        try:
            outcome = self.task.score(self.model, data, self.round_config(config))
        except TaskFailed as exc:
            log.warning("%s: TASK=%s's evaluate raised %s", step(config), self.task.name, exc)
            log.debug("the task's traceback", exc_info=exc.__cause__)
            raise wiring.AnswerFailed(f"TASK={self.task.name}'s evaluate raised {exc}") from None
        seconds = time.perf_counter() - started
        accuracy = outcome.get(protocol.ACCURACY)
        log.info(
            "%s: evaluated on %d examples, loss %.4f, accuracy %s",
            step(config),
            len(data),
            outcome["loss"],
            "n/a" if accuracy is None else f"{accuracy:.4f}",
        )
        if server_round == num_rounds:
            self.keep_final_model(server_round, accuracy, len(data))
        metrics: dict = {key: value for key, value in outcome.items() if key != "loss"}
        metrics.update({protocol.EVAL_SECONDS: seconds, protocol.SHARD: self.shard.name})
        if (
            config.get(protocol.LOCAL_BASELINE)
            and server_round == num_rounds
            and not self.withholds(protocol.LOCAL_BASELINE)
        ):
            local = self.local_only_accuracy(config, data)
            if local is not None:
                metrics[protocol.LOCAL_ACCURACY] = local
        return outcome["loss"], len(data), metrics

    def withholds(self, what: str) -> bool:
        """DP_METRICS=withheld under DP=record: `what`, computed on training records, is not
        sent (said in the log)."""
        if self.privacy is None or self.settings.dp_metrics != "withheld":
            return False
        log.info("%s: not run, DP_METRICS=withheld (it would report on the private training records)", what)
        return True

    def evaluation_split(self, config: dict) -> tuple[np.ndarray, np.ndarray]:
        """The images and labels the server's EVALUATE_SPLIT asks for (the test split by default)."""
        if config.get(protocol.EVALUATE_SPLIT, "test") != "validation":
            return self.shard.x_test, self.shard.y_test
        if self.shard.x_val is None or self.shard.y_val is None:
            log.warning("%s: the server asks for EVALUATE_SPLIT=validation; %s has none", step(config), self.shard.name)
            raise wiring.AnswerFailed(no_validation_split(self.shard))
        return self.shard.x_val, self.shard.y_val

    def local_only_accuracy(self, config: dict, test: Any) -> float | None:
        """LOCAL_BASELINE: the accuracy, on this shard's test split, of the task's fresh model
        trained on this shard alone for as many epochs as the federation trained (NUM_ROUNDS x
        LOCAL_EPOCHS): what this site would have without federating."""
        run = self.round_config(config)
        epochs = max(1, run.num_rounds * run.epochs)
        model = self.task.new_model(self.shard.spec, self.settings.seed, self.settings.device)
        train = to_data(self.shard.x_train, self.shard.y_train, self.shard.spec, self.settings.device)
        try:
            self.task.fit(model, train, replace(run, epochs=epochs, global_weights=global_parameters(model)))
            accuracy = self.task.score(model, test, run).get(protocol.ACCURACY)
        except TaskFailed as exc:
            log.warning("LOCAL_BASELINE: TASK=%s failed to train the local-only model: %s", self.task.name, exc)
            return None
        if accuracy is not None:
            log.info("local-only model (%d epochs on this shard alone): accuracy %.4f", epochs, accuracy)
        return accuracy

    def keep_final_model(self, server_round: int, accuracy: float | None, examples: int) -> None:
        if self.model_dir is None:
            return
        path = self.model_dir / FINAL_MODEL
        meta = {
            "round": server_round,
            "shard": self.shard.name,
            "spec": self.shard.spec.to_json(),
            "task": self.task.name,
            "local_test_accuracy": accuracy,
            "local_test_examples": examples,
        }
        save_model(path, self.get_parameters({}), meta)
        log.info("kept the final global model in %s", path)


def step(config: dict) -> str:
    """What an instruction is for, in its mode's words: "round 3" (sync), "version 2" (async:
    the model version trained on or evaluated)."""
    if protocol.MODEL_VERSION in config:
        return f"version {config[protocol.MODEL_VERSION]}"
    return f"round {config.get(protocol.SERVER_ROUND) or '?'}"


def run_client(settings: Settings) -> None:
    """Claim a shard (or CLIENTS_PER_PROCESS of them), connect (with retries), train for the
    whole run, keep the final model."""
    tame_flower(settings.log_level)
    torch.set_num_threads(settings.torch_threads)
    task = load_task(settings.task, settings.task_dir)  # a task that cannot be imported says so first
    check_device(settings.device)
    wait_for_shards(settings.data_dir, settings.shards_timeout)
    site_shards = settings.site_shard_indices if settings.site_shards else None
    if settings.clients_per_process > 1:
        run_fleet(settings, site_shards, lambda folder, slot, keeps: ready_client(settings, task, folder, slot, keeps))
        return
    with claim_shard(settings.data_dir, settings.shard_id, site_shards) as folder:
        wiring.block_on(ready_client(settings, task, folder)())


def ready_client(
    settings: Settings,
    task: Task,
    folder: Path,
    slot: AbstractContextManager[Any] | None = None,
    keeps_final_model: bool = True,
) -> Callable[[], Coroutine[Any, Any, None]]:
    """One client on its claimed shard's folder, loaded and built (what can fail before any
    connection fails here); what it returns joins the server and serves until the run ends
    (RunIncomplete when the server ended the run before it completed)."""
    shard = load_shard(folder)
    log.info(
        "claimed %s of %s: %d train and %d test examples%s",
        shard.name,
        shard.spec.dataset,
        len(shard.y_train),
        len(shard.y_test),
        "" if shard.y_val is None else f", {len(shard.y_val)} held out for validation",
    )
    if settings.evaluate_split == "validation" and shard.y_val is None:
        # The server's setting is the one that counts (it asks every round); the same .env here
        # says at once what every round would otherwise fail on.
        raise BadInput(no_validation_split(shard))
    model_dir = settings.results_dir / f"client_{shard.name}" if keeps_final_model else None
    client = FlowerpotClient(shard, settings, model_dir, task, slot)
    endpoint = wiring.Endpoint(
        address=settings.server_address,
        name=settings.client_name,
        max_message_bytes=settings.max_message_bytes,
        connect_timeout=settings.connect_timeout,
        keepalive_seconds=settings.keepalive_seconds,
        join=join_value(
            site_name(settings),
            shard.name,
            shard.data_checksum,
            input_fingerprint(shard.spec, client.task, client.model),
        ),
        **tls_options(settings),
    )

    async def serve() -> None:
        if not await wiring.serve(client.to_client(), endpoint):
            raise RunIncomplete(
                f"the server at SERVER_ADDRESS={settings.server_address} ended the run before it completed "
                f"(its log says why); {shard.name} is released: start the run again"
            )
        log.info("the run completed; %s is released", shard.name)

    return serve


def site_name(settings: Settings) -> str:
    """SITE_NAME, else the client certificate's name (CLIENT_AUTH=certificate), else
    FLOWERPOT_DEFAULT_SITE (Compose sets the project's name: a container's host name is an id
    new every run), else the host name: what names this machine in the server's logs, history
    and metrics."""
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
    return os.environ.get("FLOWERPOT_DEFAULT_SITE") or socket.gethostname()


def input_fingerprint(spec: ImageSpec, task: Task, model: torch.nn.Module) -> dict:
    """What defines this client's input: every client of a run must agree on all of it. Its task
    too: the task's name, its model's arrays (shapes and dtypes) and its METRICS (the server
    learns the run's extra metrics from them)."""
    fingerprint = {
        "dataset": spec.dataset,
        "classes": list(spec.classes),
        "image_size": f"{spec.height}x{spec.width}",
        "channels": spec.channels,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "task": task.name,
        "model": model_layout(model),
    }
    if task.metrics:
        fingerprint["metrics"] = dict(sorted(task.metrics.items()))
    return fingerprint


def check_device(device: str) -> None:
    """DEVICE names a device torch has here (untested on GPUs: the project's machines have none)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"DEVICE={device}, but torch sees no CUDA GPU on this machine: set DEVICE=cpu")


# Room for a Flower message's framing and metrics around the model's arrays.
MESSAGE_OVERHEAD_BYTES = 1024 * 1024


def check_message_size(task: Task, model: torch.nn.Module, settings: Settings) -> None:
    """A model whose weights do not fit in MAX_MESSAGE_MB could never be sent: said at start."""
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size + MESSAGE_OVERHEAD_BYTES > settings.max_message_bytes:
        needed = -(-(size + MESSAGE_OVERHEAD_BYTES) // (1024 * 1024))
        raise BadInput(
            f"TASK={task.name}'s model has {size / 2**20:.1f} MiB of weights, more than MAX_MESSAGE_MB="
            f"{settings.max_message_mb} lets through: set MAX_MESSAGE_MB to at least {needed} on the server "
            "and every client"
        )


def signing_identity(settings: Settings) -> Identity | None:
    """What signs this client's keys under secure aggregation: its client certificate, when it has one."""
    if not settings.secure_aggregation or settings.client_auth != "certificate":
        return None
    options = tls_options(settings)
    return Identity(options["private_key"], options["certificate_chain"], options["root_certificates"])


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
