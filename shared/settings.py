"""Every Flowerpot setting, read from the environment (and an optional .env file) in one place.

Each field's description is the text shown to the user as "allowed" when a value is rejected,
so a bad value always produces one line that names the variable, the value and the fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import BadInput

Strategy = Literal[
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedavgm",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
]
Dataset = Literal["digits", "mnist", "fashion-mnist", "cifar10", "folder"]
Partition = Literal["iid", "dirichlet", "pathological"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
ClientAuth = Literal["none", "certificate"]


_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^:\s\[\]]+):(\d{1,5})")


def _one_of(kind: Any) -> str:
    return "one of " + ", ".join(get_args(kind))


def _whole(low: int, high: int | None = None) -> str:
    return f"a whole number from {low} to {high}" if high else f"a whole number >= {low}"


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
    num_rounds: int = Field(5, ge=1, le=100_000, description=_whole(1, 100_000))
    fraction_fit: float = Field(1.0, gt=0, le=1, description="a number > 0 and <= 1")
    fraction_evaluate: float = Field(1.0, ge=0, le=1, description="a number from 0 to 1")
    min_fit_clients: int = Field(2, ge=1, description=_whole(1))
    min_evaluate_clients: int = Field(2, ge=0, description=_whole(0))
    min_available_clients: int = Field(3, ge=1, description=_whole(1))
    max_clients: int = Field(10, ge=1, le=10_000, description=_whole(1, 10_000))
    allowed_clients: str = Field("", description="a comma-separated list of client names (empty: any client)")

    # Strategy and its knobs (empty means the Flower strategy's own default)
    strategy: Strategy = Field("fedavg", description=_one_of(Strategy))
    proximal_mu: float = Field(0.1, ge=0, description="a number >= 0")
    server_learning_rate: float | None = Field(None, gt=0, description="a number > 0, or empty")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="a number >= 0 and < 1")
    beta_1: float | None = Field(None, ge=0, lt=1, description="a number >= 0 and < 1, or empty")
    beta_2: float | None = Field(None, ge=0, lt=1, description="a number >= 0 and < 1, or empty")
    tau: float | None = Field(None, gt=0, description="a number > 0, or empty")
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="a number >= 0 and < 0.5")
    krum_malicious_clients: int = Field(0, ge=0, description=_whole(0))
    krum_clients_to_keep: int = Field(0, ge=0, description=_whole(0))

    # Local training
    local_epochs: int = Field(3, ge=1, le=1000, description=_whole(1, 1000))
    batch_size: int = Field(32, ge=1, le=65_536, description=_whole(1, 65_536))
    learning_rate: float = Field(0.05, gt=0, le=10, description="a number > 0 and <= 10")
    client_restarts: int = Field(0, ge=0, le=100, description=_whole(0, 100))
    torch_threads: int = Field(1, ge=1, le=256, description=_whole(1, 256))

    # Data
    dataset: Dataset = Field("digits", description=_one_of(Dataset))
    folder_path: Path | None = Field(None, description="a folder with one sub-folder of images per class")
    image_size: int = Field(32, ge=4, le=512, description=_whole(4, 512))
    image_channels: int = Field(3, description="1 (grayscale) or 3 (RGB)")
    partition: Partition = Field("iid", description=_one_of(Partition))
    dirichlet_alpha: float = Field(0.5, gt=0, le=1000, description="a number > 0")
    labels_per_client: int = Field(2, ge=1, description=_whole(1))
    num_shards: int = Field(3, ge=1, le=10_000, description=_whole(1, 10_000))
    min_shard_size: int = Field(20, ge=2, description=_whole(2))
    test_fraction: float = Field(0.2, gt=0, lt=1, description="a number > 0 and < 1")
    max_examples: int = Field(0, ge=0, description="a whole number >= 0 (0: all)")
    seed: int = Field(42, ge=0, le=2**32 - 1, description=_whole(0, 2**32 - 1))
    shard_id: int | None = Field(None, ge=0, description="a shard number >= 0, or empty")

    # Places
    data_dir: Path = Field(Path("data"), description="a folder path")
    download_dir: Path | None = Field(None, description="a folder path, or empty")
    results_dir: Path = Field(Path("results"), description="a folder path")
    server_listen_address: str = Field("0.0.0.0:8080", description="HOST:PORT with a port from 1 to 65535")
    server_address: str = Field("server:8080", description="HOST:PORT with a port from 1 to 65535")
    max_message_mb: int = Field(512, ge=1, le=2047, description=_whole(1, 2047))

    # Waits, in seconds; none is unbounded (and none longer than a week: larger values overflow
    # the waits of threading and gRPC, or mean "forever" by mistake)
    start_timeout: float = Field(120, gt=0, le=604_800, description="seconds > 0 and <= 604800 (a week)")
    rejoin_timeout: float = Field(60, gt=0, le=604_800, description="seconds > 0 and <= 604800 (a week)")
    round_timeout: float = Field(600, gt=0, le=604_800, description="seconds > 0 and <= 604800 (a week)")
    connect_timeout: float = Field(60, gt=0, le=604_800, description="seconds > 0 and <= 604800 (a week)")

    # Security
    tls_enabled: bool = Field(False, description="true or false")
    client_auth: ClientAuth = Field("none", description=_one_of(ClientAuth))
    certs_dir: Path = Field(Path("certs"), description="a folder path")
    cert_hosts: str = Field("", description="a comma-separated list of extra DNS names or IPs for the server")
    client_name: str = Field("", description="a client name (the certificate to use)")

    # What one client may send (issue 9, section 3: server/update_checks.py)
    max_client_examples: int = Field(
        0, ge=0, le=10**12, description="a whole number >= 0 (0: the size of the data set, when the server knows it)"
    )
    update_norm_limit: float = Field(1000.0, gt=0, le=1e12, description="a number > 0 and <= 1e12")
    initial_model: Path | None = Field(None, description="a model .npz file (e.g. a run's final_model.npz), or empty")

    log_level: LogLevel = Field("INFO", description=_one_of(LogLevel))

    @field_validator("strategy", "dataset", "partition", "client_auth", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("image_channels")
    @classmethod
    def _channels(cls, value: int) -> int:
        if value not in (1, 3):
            raise ValueError("expected 1 or 3")
        return value

    @field_validator("server_listen_address", "server_address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        match = _HOST_PORT.fullmatch(value.strip())
        if not match or not 0 < int(match.group(2)) < 65536:
            raise ValueError("expected HOST:PORT")
        return value.strip()

    @property
    def raw_dir(self) -> Path:
        return self.download_dir or self.data_dir / "raw"

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def allowed_client_names(self) -> frozenset[str]:
        return frozenset(n.strip() for n in self.allowed_clients.split(",") if n.strip())

    @classmethod
    def load(cls, env_file: str | os.PathLike[str] | None = None) -> Settings:
        """Read and validate; any bad value raises BadInput with a one-line message."""
        try:
            settings = cls(_env_file=env_file)  # type: ignore[call-arg]
        except ValidationError as exc:
            raise BadInput(_describe(exc)) from None
        settings.check_consistency()
        return settings

    def check_consistency(self) -> None:
        """Rules that tie settings together; each failure names both variables."""
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
                self.client_auth == "none" or self.tls_enabled,
                f"CLIENT_AUTH={self.client_auth} needs TLS_ENABLED=true",
                "set TLS_ENABLED=true or CLIENT_AUTH=none",
            ),
            (
                self.strategy != "krum" or self.krum_clients_to_keep <= self.min_fit_clients,
                f"KRUM_CLIENTS_TO_KEEP={self.krum_clients_to_keep} is above MIN_FIT_CLIENTS={self.min_fit_clients}",
                "keep at most MIN_FIT_CLIENTS updates",
            ),
        ]
        for ok, problem, fix in rules:
            if not ok:
                raise BadInput(f"{problem}: {fix} (in .env or the environment)")

    def fingerprint(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The named settings as JSON-friendly values, to compare two runs or two data sets."""
        values = {n: getattr(self, n) for n in names}
        return {n: str(v) if isinstance(v, Path) else v for n, v in values.items()}


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else "?"
    field = Settings.model_fields.get(name)
    allowed = field.description if field is not None else "see README"
    env_name = name.upper()
    value = err.get("input")
    return f"{env_name}={value!r} is not valid: use {allowed} (in .env or the environment)"
