"""Every Flowerpot setting, read from the environment (and an optional .env file) in one place.

Each field says, where it is declared, everything the rest of the code needs to know about it:
- its bounds, written once: the "allowed" text shown when a value is rejected is derived from
  them, so a bad value produces one line that names the variable, the value and the true fix;
- whether it defines the run (a checkpoint is resumed only when all of these match) and whether
  it defines the data (shards are reused only when all of these match). The lists of names are
  derived from these marks, so a new setting cannot be left out of them by forgetting a list.
"""

from __future__ import annotations

import enum
import io
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from annotated_types import Ge, Gt, Le, Lt
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import BadInput
from shared.protocol import BUILTIN_TASK, clean_text, text_problem
from shared.strategy_table import STRATEGIES

Dataset = Literal["digits", "mnist", "fashion-mnist", "cifar10", "folder", "synthetic"]
Partition = Literal["iid", "dirichlet", "pathological"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
ClientAuth = Literal["none", "certificate"]
Mode = Literal["sync", "async"]
EvaluateSplit = Literal["test", "validation"]
StalenessWeighting = Literal["constant", "polynomial"]
Privacy = Literal["off", "record", "client"]
PrivateMetrics = Literal["sent", "withheld"]

DEFAULT_CLIENT_NAME = "client"

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_TASK_NAME = re.compile(rf"{_IDENTIFIER}(\.{_IDENTIFIER})*(:{_IDENTIFIER}(\.{_IDENTIFIER})*)?")
_DEVICE = re.compile(r"cpu|cuda(:\d{1,2})?")

_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^:\s\[\]]+):(\d{1,5})")


class Defines(enum.Flag):
    """What a setting defines. NOTHING is a conscious choice too: every field must say one."""

    NOTHING = 0
    RUN = enum.auto()  # another value is another run: a checkpoint made with it is not resumed
    DATA_ONLY = enum.auto()  # use DATA, which also defines the run


NOTHING, RUN = Defines.NOTHING, Defines.RUN
DATA = Defines.DATA_ONLY | Defines.RUN  # other shards are another run, too
_KINDS = {"run": Defines.RUN, "data": Defines.DATA_ONLY}


def setting(
    default: Any,
    defines: Defines,
    *,
    allowed: str | None = None,
    when: tuple[str, str | list[Any]] | None = None,
    unit: str | None = None,
    note: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A settings field with its marks. A number gives only its bounds (ge, gt, le, lt): its
    "allowed" text is derived from them and from its type (see `allowed_text`); other fields
    say it in `allowed`. `when=(name, value)`: the setting shapes the data only while setting
    `name` has `value`, or one of a list of values (DIRICHLET_ALPHA shapes only dirichlet shards)."""
    extra: dict[str, Any] = {"defines": [k for k, flag in _KINDS.items() if flag in defines]}
    if when is not None:
        extra["when"] = list(when)
    extra.update({k: v for k, v in {"unit": unit, "note": note}.items() if v is not None})
    return Field(default, description=allowed, json_schema_extra=extra, ge=ge, gt=gt, le=le, lt=lt)


def allowed_text(field: FieldInfo) -> str:
    """What a number field accepts, in words, from its type and bounds: "a whole number from 1
    to 1000", "a number > 0 and <= 1", "seconds > 0", with ", or empty" when it may be empty.
    A whole number's > and < read as >= and <= of the next whole number."""
    kinds = get_args(field.annotation) or (field.annotation,)
    whole = int in kinds
    bounds: dict[str, Any] = {}
    for item in field.metadata:
        for key, kind in (("ge", Ge), ("gt", Gt), ("le", Le), ("lt", Lt)):
            if isinstance(item, kind):
                bounds[key] = getattr(item, key)
    if whole and "gt" in bounds:
        bounds["ge"] = bounds.pop("gt") + 1
    if whole and "lt" in bounds:
        bounds["le"] = bounds.pop("lt") - 1
    marks = _marks(field)
    noun = marks.get("unit") or ("a whole number" if whole else "a number")
    if "ge" in bounds and "le" in bounds:
        text = f"{noun} from {bounds['ge']} to {bounds['le']}"
    else:
        symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        low = [f"{symbols[k]} {bounds[k]}" for k in ("ge", "gt") if k in bounds]
        high = [f"{symbols[k]} {bounds[k]}" for k in ("le", "lt") if k in bounds]
        text = " ".join([noun, " and ".join(low + high)]).strip()
    if marks.get("note"):
        text += f" ({marks['note']})"
    return text + (", or empty" if type(None) in kinds else "")


def _marks(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _one_of(kind: Any) -> str:
    return "one of " + ", ".join(get_args(kind))


class Settings(BaseSettings):
    """All settings; the environment variable of each field is its name in capitals."""

    model_config = SettingsConfigDict(
        case_sensitive=False,
        env_ignore_empty=True,  # `NAME=` in .env means "use the default"
        extra="ignore",
        allow_inf_nan=False,
        validate_default=True,
    )

    # Federation
    num_rounds: int = setting(5, RUN, ge=1, le=100_000)
    fraction_fit: float = setting(1.0, RUN, gt=0, le=1)
    fraction_evaluate: float = setting(1.0, RUN, ge=0, le=1)
    min_fit_clients: int = setting(2, RUN, ge=1)
    min_evaluate_clients: int = setting(2, RUN, ge=0)
    min_available_clients: int = setting(3, RUN, ge=1)
    max_clients: int = setting(10, NOTHING, ge=1, le=10_000)
    allowed_clients: str = setting("", NOTHING, allowed="a comma-separated list of client names (empty: any client)")

    # Strategy and its knobs (empty means the Flower strategy's own default)
    strategy: str = setting("fedavg", RUN, allowed="one of " + ", ".join(STRATEGIES))  # shared/strategy_table.py
    proximal_mu: float = setting(0.1, RUN, ge=0)
    server_learning_rate: float | None = setting(None, RUN, gt=0)
    server_momentum: float = setting(0.9, RUN, ge=0, lt=1)
    beta_1: float | None = setting(None, RUN, ge=0, lt=1)
    beta_2: float | None = setting(None, RUN, ge=0, lt=1)
    tau: float | None = setting(None, RUN, gt=0)
    trim_fraction: float = setting(0.2, RUN, ge=0, lt=0.5)
    krum_malicious_clients: int = setting(0, RUN, ge=0)
    krum_clients_to_keep: int = setting(0, RUN, ge=0)
    # A strategy must not adopt what a few clients sent as if all had: a round in which fewer than
    # this fraction of the sampled clients sent a sound update is not applied (Flower's FaultTolerantFedAvg: 0.5)
    min_completion_rate: float = setting(0.5, RUN, ge=0, le=1)
    # Over-selection (Bonawitz et al. 2019): a sync round aggregates the first answers and does
    # not wait for stragglers, whose late answers are dropped and counted.
    fit_quorum: float = setting(
        1.0, RUN, when=("mode", "sync"), gt=0, le=1, note="sync: share of the sampled clients whose answers end the fit"
    )
    round_deadline: float | None = setting(
        None, RUN, when=("mode", "sync"), gt=0, le=604_800, unit="seconds", note="sync: empty = none"
    )
    # The personalisation view: at the last evaluation each client also trains a model on its own
    # shard alone (NUM_ROUNDS x LOCAL_EPOCHS epochs, from the task's fresh model) and reports its
    # accuracy on the same test split beside the global model's. It costs one local training.
    local_baseline: bool = setting(False, NOTHING, allowed="true or false")
    # What the clients' federated evaluation scores: the test splits (reported), or the
    # validation splits (VALIDATION_FRACTION above 0 in `prepare`) for tuning settings.
    evaluate_split: EvaluateSplit = setting("test", RUN, allowed=_one_of(EvaluateSplit))
    # Norm clipping (Sun et al. 2019): each sound update is scaled to at most this L2 distance
    # from the global model before any strategy aggregates it; 0 clips nothing
    clip_norm: float = setting(0.0, RUN, ge=0, le=1e6, note="0: no clipping")

    # Differential privacy (docs/privacy.md). record (client/privacy/): each site trains with
    # DP-SGD, per-example clipping and secure Gaussian noise, and its shard's ledger composes
    # every step ever released from it; a site whose next fit would pass the budget declines it.
    # client (server/training/client_privacy.py): the server samples clients by secure Poisson
    # sampling, clips each update and adds noise to their equal-weight sum: DP-FedAvg.
    dp: Privacy = setting("off", RUN, allowed=_one_of(Privacy))
    dp_noise_multiplier: float = setting(1.0, RUN, when=("dp", ["record", "client"]), ge=0.1, le=100)
    dp_clip_norm: float = setting(1.0, RUN, when=("dp", ["record", "client"]), gt=0, le=1e6)
    dp_delta: float = setting(
        1e-5,
        RUN,
        when=("dp", ["record", "client"]),
        gt=0,
        lt=1,
        note="at most 1/(2 x a shard's training examples); DP=client: 1/(2 x MAX_CLIENTS)",
    )
    dp_epsilon_budget: float | None = setting(
        None, NOTHING, when=("dp", ["record", "client"]), gt=0, le=1000, note="empty: no budget"
    )
    # What a private site reports besides its update: sent, every metric as computed (the
    # training loss and accuracy read the private records and carry no noise); withheld, none
    # computed on training records (no training metrics, no LOCAL_BASELINE): evaluations of the
    # global model on the test or validation split are still sent.
    dp_metrics: PrivateMetrics = setting("sent", NOTHING, when=("dp", "record"), allowed=_one_of(PrivateMetrics))
    dp_ledger_dir: Path | None = setting(
        None, NOTHING, allowed="a writable folder for the shards' privacy ledgers (empty: DATA_DIR/privacy)"
    )

    # Secure aggregation (docs/secure-aggregation.md): SecAgg+, the server unmasks only the sum of
    # a round's updates. Each client clips its update to +-SECAGG_CLIP_RANGE per coordinate and
    # quantizes it to SECAGG_QUANTIZATION_BITS; a secret is split among a client's neighbourhood
    # (SECAGG_NEIGHBOURS others on a ring, 0: all), and SECAGG_THRESHOLD of it rebuilds one.
    secure_aggregation: bool = setting(False, RUN, allowed="true or false")
    secagg_threshold: float = setting(
        0.6, RUN, when=("secure_aggregation", [True]), gt=0.5, le=1,
        note="share of a neighbourhood, itself included, whose shares rebuild a secret",
    )  # fmt: skip
    secagg_neighbours: int = setting(
        0, RUN, when=("secure_aggregation", [True]), ge=0, le=10_000,
        note="even; 0: every sampled client (SecAgg), else e.g. 16 at 1,000 clients (SecAgg+)",
    )  # fmt: skip
    secagg_clip_range: float = setting(
        1.0, RUN, when=("secure_aggregation", [True]), gt=0, le=1e6, note="each coordinate of an update, within +-this"
    )
    secagg_quantization_bits: int = setting(22, RUN, when=("secure_aggregation", [True]), ge=8, le=30)
    secagg_stage_timeout: float = setting(
        30, NOTHING, gt=0, le=604_800, unit="seconds", note="the key and unmask stages' wait; training: ROUND_TIMEOUT"
    )

    # Asynchronous training (server/training/buffered.py), so that a slow client does not hold up
    # the rest: FedBuff's buffer of client updates, FedAsync's staleness weighting. NUM_ROUNDS
    # counts aggregations (model versions) in both modes.
    mode: Mode = setting("sync", RUN, allowed=_one_of(Mode))
    buffer_size: int | None = setting(
        None, RUN, when=("mode", "async"), ge=1, le=10_000, note="async; empty: MIN_FIT_CLIENTS"
    )
    concurrency: int = setting(0, NOTHING, ge=0, le=10_000, note="async; 0: every connected client")
    max_staleness: int = setting(10, RUN, when=("mode", "async"), ge=0, le=100_000, note="async")
    staleness_weighting: StalenessWeighting = setting(
        "polynomial", RUN, when=("mode", "async"), allowed=_one_of(StalenessWeighting)
    )
    staleness_exponent: float = setting(
        0.5, RUN, when=("mode", "async"), ge=0, le=10, note="async, polynomial: 1/(1+staleness)^this"
    )
    # Empty: evaluate once per connected clients' worth of updates (every ceil(clients / BUFFER_SIZE)
    # versions), so that async asks its clients for as many evaluations per update as sync
    # rounds do; every version would take 1.5 x that with 3 clients and the default buffer of 2.
    eval_every: int | None = setting(
        None, NOTHING, ge=1, le=100_000, note="async: evaluate every this many versions; empty: see .env"
    )
    final_eval_timeout: float = setting(
        30, NOTHING, ge=0, le=604_800, unit="seconds", note="async: the final evaluation's wait for clients training"
    )

    # Local training
    local_epochs: int = setting(3, RUN, ge=1, le=1000)
    batch_size: int = setting(32, RUN, ge=1, le=65_536)
    learning_rate: float = setting(0.05, RUN, gt=0, le=10)
    client_restarts: int = setting(0, NOTHING, ge=0, le=100)
    torch_threads: int = setting(1, NOTHING, ge=1, le=256)
    # Many logical clients in one process (load tests, many small devices emulated on a few
    # machines): each claims its own shard and holds its own stream, identity, seed and model;
    # they share the process's PyTorch, so memory grows by a shard and a model, not a runtime.
    # 1,000 is where one process's threads and memory stop being a sane unit: run more processes.
    clients_per_process: int = setting(1, NOTHING, ge=1, le=1000)
    # How many of one process's logical clients train or evaluate at once; the others wait.
    training_slots: int = setting(1, NOTHING, ge=1, le=64)
    # The user's model as a task plug-in (client/tasks/): a module, or module:object, with
    # build_model(spec) and optionally train, evaluate, METRICS and predict_transform. Another
    # task is another run; the folder it is imported from is each machine's own affair.
    task: str = setting("", RUN, allowed="a module name or module:object (empty: the built-in CNN task)")
    task_dir: Path | None = setting(None, NOTHING, allowed="a folder put first on the import path, or empty")
    device: str = setting("cpu", NOTHING, allowed="cpu, cuda or cuda:N (the torch device the task runs on)")
    # An emulation knob for tests and benchmarks, not a feature: a client with CLIENT_SLOWDOWN=4
    # waits after its real training until the fit took 4 times as long (a slow device).
    client_slowdown: float = setting(1.0, NOTHING, ge=1, le=1000)
    # With it, each fit's slowdown is CLIENT_SLOWDOWN x exp(sigma x Z), Z standard normal drawn
    # from SEED, the shard and the fit (log-normal, heavy-tailed as real devices' fit times are;
    # never below 1): the benchmark's devices whose speed varies from fit to fit.
    client_slowdown_spread: float = setting(0.0, NOTHING, ge=0, le=3, note="log-normal sigma; 0: constant")

    # Data
    dataset: Dataset = setting("digits", DATA, allowed=_one_of(Dataset))
    folder_path: Path | None = setting(
        None, DATA, when=("dataset", "folder"), allowed="a folder with one sub-folder of images per class"
    )
    image_size: int = setting(32, DATA, when=("dataset", "folder"), ge=4, le=512)
    image_channels: int = setting(3, DATA, when=("dataset", "folder"), allowed="1 (grayscale) or 3 (RGB)")
    # Generated 8x8 images of 10 classes, deterministic from SEED: load tests with many clients
    # (digits' 1,797 images are too few for 1,000 shards).
    synthetic_examples: int = setting(60_000, DATA, when=("dataset", "synthetic"), ge=100, le=2_000_000)
    partition: Partition = setting("iid", DATA, allowed=_one_of(Partition))
    dirichlet_alpha: float = setting(0.5, DATA, when=("partition", "dirichlet"), gt=0, le=1000)
    labels_per_client: int = setting(2, DATA, when=("partition", "pathological"), ge=1)
    num_shards: int = setting(3, DATA, ge=1, le=10_000)
    min_shard_size: int = setting(20, DATA, ge=2)
    test_fraction: float = setting(
        0.2, DATA, gt=0, lt=1, note="digits, folder: MNIST, Fashion-MNIST, CIFAR-10 test on the official test set"
    )
    # Held out of each shard's training examples (after its test split, which stays as it was):
    # the data that settings are tuned on, so that the reported test accuracy is not tuned on.
    validation_fraction: float = setting(0.0, DATA, ge=0, lt=0.5, note="0: no validation split")
    max_examples: int = setting(0, DATA, ge=0, note="0: all")
    seed: int = setting(42, DATA, ge=0, le=2**32 - 1)
    shard_id: int | None = setting(None, NOTHING, ge=0)

    # Places
    data_dir: Path = setting(Path("data"), NOTHING, allowed="a folder path")
    download_dir: Path | None = setting(None, NOTHING, allowed="a folder path, or empty")
    results_dir: Path = setting(Path("results"), NOTHING, allowed="a folder path")
    server_listen_address: str = setting("0.0.0.0:8080", NOTHING, allowed="HOST:PORT with a port from 1 to 65535")
    server_address: str = setting("server:8080", NOTHING, allowed="HOST:PORT with a port from 1 to 65535")
    # 16 MiB: about 8x the largest shipped model (the CIFAR-10 CNN, 2.1 MiB of float32 weights),
    # rounded to a power of two; a folder data set with IMAGE_SIZE above about 64 may need more.
    max_message_mb: int = setting(16, NOTHING, ge=1, le=2047)
    metrics_port: int = setting(0, NOTHING, ge=0, le=65535, note="0: no metrics endpoint")
    # Every round's global model in RESULTS_DIR/models/, to evaluate a run afterwards at each point
    # of its history (the benchmark does); off: a file per round is a cost only such uses need.
    keep_all_models: bool = setting(False, NOTHING, allowed="true or false")
    metrics_linger: float = setting(10, NOTHING, ge=0, le=3600, unit="seconds")

    # Waits, in seconds; none is unbounded (and none longer than a week: larger values overflow
    # the waits of threading and gRPC, or mean "forever" by mistake)
    start_timeout: float = setting(120, NOTHING, gt=0, le=604_800, unit="seconds", note="a week at most")
    rejoin_timeout: float = setting(60, NOTHING, gt=0, le=604_800, unit="seconds", note="a week at most")
    round_timeout: float = setting(600, NOTHING, gt=0, le=604_800, unit="seconds", note="a week at most")
    connect_timeout: float = setting(60, NOTHING, gt=0, le=604_800, unit="seconds", note="a week at most")

    # Transport: how soon a peer that vanished without closing its connection is noticed
    keepalive_seconds: int = setting(20, NOTHING, ge=5, le=3600)

    # Docker Swarm: nothing starts a node's prepare step before its clients, so a client
    # may wait for the shards (0: it does not, and a DATA_DIR without shards is refused at once)
    shards_timeout: float = setting(0, NOTHING, ge=0, le=604_800, unit="seconds", note="a week at most")

    # Security
    tls_enabled: bool = setting(False, NOTHING, allowed="true or false")
    client_auth: ClientAuth = setting("none", NOTHING, allowed=_one_of(ClientAuth))
    certs_dir: Path = setting(Path("certs"), NOTHING, allowed="a folder path")
    cert_hosts: str = setting("", NOTHING, allowed="a comma-separated list of extra DNS names or IPs for the server")
    # The name a client gives the server, and with TLS the bundle CERTS_DIR/clients/NAME it uses:
    # one default for both, the same as `flowerpot certs` and docker-compose.yml use.
    client_name: str = setting(
        DEFAULT_CLIENT_NAME, NOTHING, allowed="a client name of at most 64 printable characters (its certificate)"
    )
    # Mutual TLS, revocation and secure defaults
    # Seats one client certificate may hold (replicas of one site); bounded by default, so that
    # one certificate cannot fill MAX_CLIENTS. Not applied without client certificates, where a
    # client names itself and a bound per name would stop nobody.
    max_connections_per_client: int = setting(4, NOTHING, ge=0, le=10_000, note="0: no bound")
    # Which certificate may claim which shards: "site-a:0-1 site-b:2,3" (empty: first come)
    shard_owners: str = setting(
        "", NOTHING, allowed="space-separated NAME:SHARDS entries such as site-a:0-1 site-b:2,3 (empty: any)"
    )
    require_tls: bool = setting(False, NOTHING, allowed="true or false")
    allow_insecure: bool = setting(False, NOTHING, allowed="true or false")
    ca_passphrase: str = setting("", NOTHING, allowed="the CA key's passphrase (empty: not encrypted)")

    # What one client may send (server/training/update_checks.py); other bounds are another run
    max_client_examples: int = setting(
        0, RUN, ge=0, le=10**12, note="0: the size of the data set, when the server knows it"
    )
    update_norm_limit: float | None = setting(
        None, RUN, gt=0, le=1e9, note="empty: 5 x the global model's own L2 norm, every round"
    )
    update_norm_median_multiple: float = setting(
        4.0, RUN, ge=0, le=1e6, note="0: off, otherwise at least 1; times the round's median update norm"
    )
    initial_model: Path | None = setting(
        None, RUN, allowed="a model .npz file (e.g. a run's final_model.npz), or empty"
    )

    log_level: LogLevel = setting("INFO", NOTHING, allowed=_one_of(LogLevel))

    # Sites: a federation of machines, each with its own disjoint shards
    site_name: str = setting(
        "",
        NOTHING,
        allowed="a site name of at most 64 printable characters (empty: the certificate's name, else the host name)",
    )
    site_shards: str = setting(
        "", NOTHING, allowed="shard numbers below NUM_SHARDS, such as 0-2, 3,4 or 1 (empty: all)"
    )
    classes: str = setting(
        "",
        DATA,
        when=("dataset", "folder"),
        allowed="comma-separated class names in label order (empty: the folders found)",
    )

    @field_validator(
        "strategy",
        "dataset",
        "partition",
        "client_auth",
        "mode",
        "staleness_weighting",
        "dp",
        "dp_metrics",
        mode="before",
    )
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError("not a strategy of the table")
        return value

    @field_validator("update_norm_median_multiple")
    @classmethod
    def _median_multiple(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError("below 1 refuses the median update itself")
        return value

    @field_validator("site_name", "client_name")
    @classmethod
    def _name(cls, value: str) -> str:
        problem = text_problem(value)  # the server would cut it, and then not know the name
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("image_channels")
    @classmethod
    def _channels(cls, value: int) -> int:
        if value not in (1, 3):
            raise ValueError("expected 1 or 3")
        return value

    @field_validator("site_shards")
    @classmethod
    def _site_shards(cls, value: str) -> str:
        parse_shard_list(value)  # ValueError on a malformed list; the bound is checked below
        return value.strip()

    @field_validator("shard_owners")
    @classmethod
    def _shard_owners(cls, value: str) -> str:
        parse_shard_owners(value)  # ValueError on a malformed list; the bound is checked below
        return " ".join(value.split())

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",")] if value.strip() else []
        if names and (len(names) < 2 or "" in names or len(set(names)) != len(names)):
            raise ValueError("expected at least two distinct, non-empty class names")
        return ",".join(names)

    @field_validator("task")
    @classmethod
    def _task(cls, value: str) -> str:
        value = value.strip()
        if value == BUILTIN_TASK:  # its name, as the model files and the refusals spell it
            return ""
        if value and not _TASK_NAME.fullmatch(value):
            raise ValueError("expected a module name or module:object")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE.fullmatch(value):
            raise ValueError("expected cpu, cuda or cuda:N")
        return value

    @field_validator("server_listen_address", "server_address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        match = _HOST_PORT.fullmatch(value.strip())
        if not match or not 0 < int(match.group(2)) < 65536:
            raise ValueError("expected HOST:PORT")
        return value.strip()

    @property
    def task_name(self) -> str:
        """TASK as model files, joins and refusals name it: the built-in task is "builtin"."""
        return self.task or BUILTIN_TASK

    @property
    def raw_dir(self) -> Path:
        return self.download_dir or self.data_dir / "raw"

    @property
    def site_shard_indices(self) -> tuple[int, ...]:
        """The shards this site prepares and serves (SITE_SHARDS), in order; all when empty."""
        return parse_shard_list(self.site_shards) or tuple(range(self.num_shards))

    @property
    def shard_owner_map(self) -> dict[str, tuple[int, ...]]:
        """SHARD_OWNERS as certificate name -> its shard numbers; empty when not set."""
        return parse_shard_owners(self.shard_owners)

    @property
    def class_names(self) -> tuple[str, ...]:
        """CLASSES as a tuple; empty when not set (the folder's own sub-folders decide)."""
        return tuple(self.classes.split(",")) if self.classes else ()

    @property
    def updates_per_aggregation(self) -> tuple[int, str]:
        """How many client updates one aggregation takes, and the setting that says so:
        MIN_FIT_CLIENTS in a synchronous round, BUFFER_SIZE (empty: the same) in async mode."""
        if self.mode == "async" and self.buffer_size is not None:
            return self.buffer_size, "BUFFER_SIZE"
        return self.min_fit_clients, "MIN_FIT_CLIENTS"

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def allowed_client_names(self) -> frozenset[str]:
        return frozenset(n.strip() for n in self.allowed_clients.split(",") if n.strip())

    @classmethod
    def load(cls, env_file: str | os.PathLike[str] | None = None) -> Settings:
        """Read and validate; any bad value raises BadInput with a one-line message."""
        check_retired_environment()
        try:
            return cls(_env_file=env_file)  # type: ignore[call-arg]
        except ValidationError as exc:
            raise BadInput(_describe(exc)) from None

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Rules that tie settings together, checked for every Settings however it is made;
        each failure names both variables. BadInput is not a ValueError, so pydantic lets it
        through as it is: the one line the user sees."""
        rules = [
            (
                self.min_fit_clients <= self.min_available_clients,
                f"MIN_FIT_CLIENTS={self.min_fit_clients} is above MIN_AVAILABLE_CLIENTS={self.min_available_clients}",
                "set MIN_FIT_CLIENTS at or below MIN_AVAILABLE_CLIENTS",
            ),
            (
                self.min_evaluate_clients <= self.min_available_clients,
                f"MIN_EVALUATE_CLIENTS={self.min_evaluate_clients} is above "
                f"MIN_AVAILABLE_CLIENTS={self.min_available_clients}",
                "set MIN_EVALUATE_CLIENTS at or below MIN_AVAILABLE_CLIENTS",
            ),
            (
                self.min_available_clients <= self.max_clients,
                f"MIN_AVAILABLE_CLIENTS={self.min_available_clients} is above MAX_CLIENTS={self.max_clients}",
                "raise MAX_CLIENTS or lower MIN_AVAILABLE_CLIENTS",
            ),
            (
                self.dataset != "folder" or self.folder_path is not None,
                "DATASET=folder needs FOLDER_PATH",
                "set FOLDER_PATH to a folder with one sub-folder of images per class",
            ),
            (
                self.shard_id is None or self.shard_id < self.num_shards,
                f"SHARD_ID={self.shard_id} is not below NUM_SHARDS={self.num_shards}",
                "pick a SHARD_ID from 0 to NUM_SHARDS-1, or leave it empty",
            ),
            (
                self.shard_id is None or self.clients_per_process == 1,
                f"SHARD_ID={self.shard_id} names one shard, and CLIENTS_PER_PROCESS={self.clients_per_process} "
                "logical clients need one each",
                "leave SHARD_ID empty (they claim free shards; SITE_SHARDS limits which) or set CLIENTS_PER_PROCESS=1",
            ),
            (
                all(i < self.num_shards for i in parse_shard_list(self.site_shards)),
                f"SITE_SHARDS={self.site_shards} names a shard not below NUM_SHARDS={self.num_shards}",
                "list shard numbers from 0 to NUM_SHARDS-1 (the same NUM_SHARDS on every site)",
            ),
            (
                all(i < self.num_shards for shards in parse_shard_owners(self.shard_owners).values() for i in shards),
                f"SHARD_OWNERS={self.shard_owners} names a shard not below NUM_SHARDS={self.num_shards}",
                "list shard numbers from 0 to NUM_SHARDS-1 (the same NUM_SHARDS on every site)",
            ),
            (
                not self.shard_owners or self.client_auth == "certificate",
                f"SHARD_OWNERS={self.shard_owners} needs CLIENT_AUTH=certificate (it maps certificates to shards)",
                "set CLIENT_AUTH=certificate, or leave SHARD_OWNERS empty",
            ),
            (
                self.client_auth == "none" or self.tls_enabled,
                f"CLIENT_AUTH={self.client_auth} needs TLS_ENABLED=true",
                "set TLS_ENABLED=true or CLIENT_AUTH=none",
            ),
            *STRATEGIES[self.strategy].rules(self),  # a strategy that cannot do its job here
            # DP=client's guarantee holds for one equal-weight average of the clipped updates,
            # made once per round: not for a buffer of stale ones, a server optimizer's step or
            # a robust rule whose output one update can move by more than the clip norm.
            (
                self.dp != "client" or self.mode == "sync",
                "DP=client is defined for sync rounds (one noisy average per round), not MODE=async",
                "set MODE=sync, or DP=record (each site's own DP-SGD works in async mode)",
            ),
            (
                self.dp != "client" or self.strategy in ("fedavg", "fedprox"),
                f"DP=client adds its noise to an equal-weight average of the clipped updates, which "
                f"STRATEGY={self.strategy} does not make",
                "set STRATEGY=fedavg or fedprox, or DP=record",
            ),
            (
                self.dp != "client" or self.clip_norm == 0,
                f"CLIP_NORM={self.clip_norm:g} with DP=client: DP_CLIP_NORM clips every update under DP=client",
                "set CLIP_NORM=0 (and DP_CLIP_NORM to the bound you want)",
            ),
            (
                self.dp != "client" or self.dp_delta <= largest_delta(self.max_clients),
                f"DP_DELTA={self.dp_delta:g} is not well below 1/{self.max_clients} for the MAX_CLIENTS="
                f"{self.max_clients} clients DP=client protects",
                f"set DP_DELTA at most {largest_delta(self.max_clients):.1e}",
            ),
            # Secure aggregation hides every single update from the server: what needs one is refused.
            (
                not self.secure_aggregation or self.mode == "sync",
                "SECURE_AGGREGATION=true needs a cohort that shares keys before any of it sends its input, and "
                "MODE=async's buffer fills with updates one by one, each trained on its own version",
                "set MODE=sync, or SECURE_AGGREGATION=false",
            ),
            (
                not self.secure_aggregation or not STRATEGIES[self.strategy].robust,
                f"STRATEGY={self.strategy} compares individual updates, which SECURE_AGGREGATION=true hides from "
                "the server",
                "set STRATEGY to fedavg, fedprox, fedavgm, fedadam, fedyogi or fedadagrad (they need only the sum)",
            ),
            (
                not self.secure_aggregation or self.dp != "client",
                "DP=client clips each update at the server, which SECURE_AGGREGATION=true hides from it",
                "set DP=record (each site's own DP-SGD works with secure aggregation), or SECURE_AGGREGATION=false",
            ),
            (
                not self.secure_aggregation or self.clip_norm == 0,
                f"CLIP_NORM={self.clip_norm:g} clips each update at the server, which SECURE_AGGREGATION=true hides",
                "set CLIP_NORM=0: under secure aggregation the clients clip to SECAGG_CLIP_RANGE",
            ),
            (
                not self.secure_aggregation or self.fit_quorum == 1,
                f"FIT_QUORUM={self.fit_quorum:g}: under SECURE_AGGREGATION=true every client that shared its keys "
                "is waited for (a late one is a dropout, unmasked at a cost)",
                "set FIT_QUORUM=1",
            ),
            (
                not self.secure_aggregation or self.min_fit_clients >= 3,
                f"MIN_FIT_CLIENTS={self.min_fit_clients}: with 2 clients in a round each can tell the other's update "
                "from the sum and its own",
                "set MIN_FIT_CLIENTS to 3 or more",
            ),
            (
                not self.secure_aggregation or self.secagg_neighbours % 2 == 0,
                f"SECAGG_NEIGHBOURS={self.secagg_neighbours}: a ring's neighbourhood has as many on each side",
                "set an even number, or 0 for every sampled client",
            ),
            (
                self.metrics_port == 0 or self.metrics_port != _port(self.server_listen_address),
                f"METRICS_PORT={self.metrics_port} is SERVER_LISTEN_ADDRESS's port",
                "choose another METRICS_PORT, or 0 to turn the metrics off",
            ),
        ]
        for ok, problem, fix in rules:
            if not ok:
                raise BadInput(f"{problem}: {fix} (in .env or the environment)")
        return self

    @classmethod
    def names_defining(cls, kind: Literal["run", "data"]) -> tuple[str, ...]:
        """The fields marked as defining the run, or the data, in declaration order."""
        return tuple(name for name, field in cls.model_fields.items() if kind in _marks(field).get("defines", ()))

    def applies(self, name: str) -> bool:
        """False for a setting that these settings do not use (DIRICHLET_ALPHA without
        PARTITION=dirichlet, BUFFER_SIZE without MODE=async), so that changing it makes neither
        other shards nor another run."""
        when = _marks(type(self).model_fields[name]).get("when")
        if when is None:
            return True
        values = when[1] if isinstance(when[1], list) else [when[1]]
        return getattr(self, when[0]) in values

    def fingerprint(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The named settings as JSON-friendly values, to compare two runs or two data sets."""
        values = {n: getattr(self, n) for n in names}
        return {n: str(v) if isinstance(v, Path) else v for n, v in values.items()}


# Numbers say their bounds once, in the field; their "allowed" text is made from them here. A
# field declared without `setting` has said nothing about the run and the data: a bug, caught here.
for _name, _field in Settings.model_fields.items():
    if "defines" not in _marks(_field):
        raise TypeError(f"Settings.{_name} is not declared with setting(default, RUN | DATA | NOTHING, ...)")
    if _field.description is None:
        _field.description = allowed_text(_field)


_SHARD_ITEM = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")


def parse_shard_list(text: str) -> tuple[int, ...]:
    """`0-2,5` -> (0, 1, 2, 5); empty -> (); ValueError when malformed or a range runs backwards."""
    indices: set[int] = set()
    for item in (part.strip() for part in text.split(",")) if text.strip() else ():
        match = _SHARD_ITEM.fullmatch(item)
        if not match:
            raise ValueError(f"{item!r} is not a shard number or range")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise ValueError(f"the range {item} runs backwards")
        indices.update(range(low, high + 1))
    return tuple(sorted(indices))


def parse_shard_owners(text: str) -> dict[str, tuple[int, ...]]:
    """`a:0-1 b:2` -> {"a": (0, 1), "b": (2,)}; ValueError when malformed, a name is given twice,
    or two names share a shard."""
    owners: dict[str, tuple[int, ...]] = {}
    for entry in text.split():
        name, colon, shards = entry.partition(":")
        if not colon or not name or not shards.strip():
            raise ValueError(f"{entry!r} is not NAME:SHARDS")
        if name in owners:
            raise ValueError(f"{name} is listed twice")
        owners[name] = parse_shard_list(shards)
    taken = [i for shards in owners.values() for i in shards]
    if len(taken) != len(set(taken)):
        raise ValueError("a shard is given to two names")
    return owners


def largest_delta(protected: int) -> float:
    """The largest DP_DELTA for `protected` records (DP=record) or clients (DP=client): well below
    1/N, since a delta of 1/N lets the mechanism publish one of them in the clear; 1/(2N) here."""
    return 1 / (2 * protected)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else "?"
    field = Settings.model_fields.get(name)
    allowed = field.description if field is not None else "see README"
    env_name = name.upper()
    value = err.get("input")
    shown = repr(value) if len(repr(value)) <= 80 else f"{str(value)[:40]!r}... ({len(str(value))} characters)"
    return f"{env_name}={shown} is not valid: use {allowed} (in .env or the environment)"


# .env keys that are not settings but fill in the Compose files (docker-compose*.yml), and
# Docker's own prefixes: a key that is none of these nor a setting is a typo.
COMPOSE_ONLY_KEYS = frozenset(
    {"SLOW_CLIENT_SLOWDOWN", "CLIENT_CPUS", "CLIENT_MEMORY", "GRAFANA_PORT", "SERVER_BIND", "SERVER_PORT"}
    | {"TORCH_INDEX_URL", "TORCH_PACKAGES"}
)
DOCKER_PREFIXES = ("COMPOSE_", "DOCKER_")
_KEY = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=", re.M)


# Settings that earlier versions had, with the value that behaves as this version does and why
# the others went: a file or checkpoint naming that value is read as it was meant; any other value
# is refused, since ignoring it would run something else than it asked for.
RETIRED: dict[str, tuple[str, str]] = {
    "async_step": (
        "fedbuff",
        "the buffer-relative step was dropped for FedBuff's, the only one benchmarked (docs/async.md)",
    ),
}


def retired_problem(name: str, value: object, where: str) -> str | None:
    """The refusal for a retired setting set to a value this version no longer runs, or None."""
    kept, why = RETIRED[name.lower()]
    if str(value).strip().lower() == kept:
        return None
    return f"{name.upper()}={clean_text(value, 40)} is no longer offered: {why} (in {where}: remove that line)"


def check_retired_environment(environ: Mapping[str, str] | None = None) -> None:
    """BadInput for a retired setting in the environment with a value this version cannot honour."""
    for key, value in (os.environ if environ is None else environ).items():
        if key.lower() in RETIRED and (problem := retired_problem(key, value, "the environment")):
            raise BadInput(problem)


def check_env_keys(path: str | os.PathLike[str], shown: str | None = None) -> None:
    """BadInput naming the first key of the settings file that is not a setting (with the
    closest one): a misspelt name would otherwise be ignored and its default used."""
    import difflib

    from dotenv import dotenv_values

    text = Path(path).read_text(encoding="utf-8")
    known = {n.upper() for n in Settings.model_fields}
    values = {k.upper(): v for k, v in dotenv_values(stream=io.StringIO(text)).items()}
    for key in _KEY.findall(text):
        name = key.upper()
        if name in known or name in COMPOSE_ONLY_KEYS or name.startswith(DOCKER_PREFIXES):
            continue
        if name.lower() in RETIRED:
            if problem := retired_problem(name, values.get(name) or "", shown or str(path)):
                raise BadInput(problem)
            continue
        close = difflib.get_close_matches(name, sorted(known | COMPOSE_ONLY_KEYS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see the names in the committed .env"
        raise BadInput(f"{key} is not a setting: {hint} (in {shown or path}: correct or remove that line)")
