"""Settings: typed, validated, one clear line for every bad value, defaults equal to .env."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import get_args

import pytest
from annotated_types import Ge, Gt, Le, Lt
from pydantic.fields import FieldInfo

from bench.compose import committed_env
from conftest import run_cli
from shared.errors import BadInput
from shared.settings import Settings


@pytest.fixture(autouse=True)
def no_settings_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


BAD_VALUES = [
    ({"NUM_ROUNDS": "abc"}, "NUM_ROUNDS='abc'", "whole number"),
    ({"NUM_ROUNDS": "0"}, "NUM_ROUNDS='0'", "from 1"),
    ({"NUM_ROUNDS": "2.5"}, "NUM_ROUNDS='2.5'", "whole number"),
    ({"FRACTION_FIT": "1.5"}, "FRACTION_FIT='1.5'", "> 0 and <= 1"),
    ({"FRACTION_FIT": "0"}, "FRACTION_FIT='0'", "> 0 and <= 1"),
    ({"FRACTION_FIT": "nan"}, "FRACTION_FIT='nan'", "> 0 and <= 1"),
    ({"FRACTION_EVALUATE": "-0.1"}, "FRACTION_EVALUATE='-0.1'", "from 0 to 1"),
    ({"STRATEGY": "fedfoo"}, "STRATEGY='fedfoo'", "one of fedavg, fedprox"),
    ({"DATASET": "imagenet"}, "DATASET='imagenet'", "one of digits, mnist"),
    ({"PARTITION": "random"}, "PARTITION='random'", "one of iid, dirichlet, pathological"),
    ({"DIRICHLET_ALPHA": "0"}, "DIRICHLET_ALPHA='0'", "> 0"),
    ({"LOCAL_EPOCHS": "-1"}, "LOCAL_EPOCHS='-1'", "whole number"),
    ({"BATCH_SIZE": "many"}, "BATCH_SIZE='many'", "whole number"),
    ({"LEARNING_RATE": "inf"}, "LEARNING_RATE='inf'", "> 0"),
    ({"MAX_CLIENTS": "0"}, "MAX_CLIENTS='0'", "whole number"),
    ({"SERVER_ADDRESS": "server"}, "SERVER_ADDRESS='server'", "HOST:PORT"),
    ({"SERVER_LISTEN_ADDRESS": "0.0.0.0:99999"}, "SERVER_LISTEN_ADDRESS='0.0.0.0:99999'", "HOST:PORT"),
    ({"TLS_ENABLED": "maybe"}, "TLS_ENABLED='maybe'", "true or false"),
    ({"IMAGE_CHANNELS": "2"}, "IMAGE_CHANNELS='2'", "1 (grayscale) or 3"),
    ({"TRIM_FRACTION": "0.5"}, "TRIM_FRACTION='0.5'", "< 0.5"),
    ({"SERVER_MOMENTUM": "1"}, "SERVER_MOMENTUM='1'", "< 1"),
    ({"START_TIMEOUT": "0"}, "START_TIMEOUT='0'", "seconds > 0"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL='LOUD'", "one of DEBUG"),
    ({"MIN_FIT_CLIENTS": "4"}, "MIN_FIT_CLIENTS=4 is above MIN_AVAILABLE_CLIENTS=3", "at or below"),
    ({"MIN_EVALUATE_CLIENTS": "5"}, "MIN_EVALUATE_CLIENTS=5 is above MIN_AVAILABLE_CLIENTS=3", "at or below"),
    ({"MIN_AVAILABLE_CLIENTS": "11"}, "MIN_AVAILABLE_CLIENTS=11 is above MAX_CLIENTS=10", "raise MAX_CLIENTS"),
    ({"DATASET": "folder"}, "DATASET=folder needs FOLDER_PATH", "FOLDER_PATH"),
    ({"SHARD_ID": "3"}, "SHARD_ID=3 is not below NUM_SHARDS=3", "SHARD_ID"),
    ({"CLIENT_AUTH": "certificate"}, "CLIENT_AUTH=certificate needs TLS_ENABLED=true", "TLS_ENABLED=true"),
    ({"METRICS_PORT": "65536"}, "METRICS_PORT='65536'", "a whole number from 0 to 65535 (0: no metrics endpoint)"),
    ({"METRICS_PORT": "http"}, "METRICS_PORT='http'", "a whole number from 0 to 65535 (0: no metrics endpoint)"),
    ({"METRICS_LINGER": "-1"}, "METRICS_LINGER='-1'", "seconds from 0 to 3600"),
    ({"METRICS_PORT": "8080"}, "METRICS_PORT=8080 is SERVER_LISTEN_ADDRESS's port", "choose another METRICS_PORT"),
]


@pytest.mark.parametrize(
    ("env", "names", "allowed"), BAD_VALUES, ids=[next(iter(e)) + "=" + next(iter(e.values())) for e, *_ in BAD_VALUES]
)
def test_bad_value_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, env: dict, names: str, allowed: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(BadInput) as caught:
        Settings.load()
    message = str(caught.value)
    assert "\n" not in message
    assert names in message
    assert allowed in message


# Off by default so that servers side by side never collide; the committed .env turns it on.
ENV_FILE_ONLY = {"metrics_port": 9464}


@pytest.mark.process  # reads the committed .env with git
def test_defaults_match_the_committed_env_file(tmp_path: Path) -> None:
    committed = tmp_path / ".env"
    committed.write_text(committed_env())  # not the working copy, which a user tunes
    assert Settings.load(committed).model_dump() == {**Settings.load().model_dump(), **ENV_FILE_ONLY}


@pytest.mark.process  # reads the committed .env with git
def test_every_setting_is_documented_in_env_file() -> None:
    text = committed_env()
    missing = [n.upper() for n in Settings.model_fields if f"\n{n.upper()}=" not in text]
    assert missing == []


def test_environment_overrides_env_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("NUM_ROUNDS=7\nSTRATEGY=FedProx\n")
    monkeypatch.setenv("NUM_ROUNDS", "9")
    settings = Settings.load(env_file)
    assert (settings.num_rounds, settings.strategy) == (9, "fedprox")


@pytest.mark.process
@pytest.mark.parametrize("command", ["server", "client", "prepare", "run-local"])
def test_commands_exit_2_on_bad_setting_before_any_work(tmp_path: Path, command: str) -> None:
    result = run_cli([command], cwd=tmp_path, timeout=30, NUM_ROUNDS="abc")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"flowerpot {command}: error: NUM_ROUNDS='abc' is not valid: use a whole number from 1 to 100000 "
        "(in .env or the environment)"
    ]
    assert list(tmp_path.iterdir()) == []  # nothing prepared, no results folder


@pytest.mark.process
def test_bad_value_in_env_file_names_it(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("FRACTION_FIT=1.5\n")
    result = run_cli(["server"], cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    assert "FRACTION_FIT='1.5' is not valid" in result.stderr


def test_every_setting_says_whether_it_defines_the_run_or_the_data() -> None:
    """A new field must be declared with `setting(default, RUN | DATA | NOTHING)`; a field left
    unmarked would silently resume another run or reuse other shards."""
    unmarked = [
        name
        for name, field in Settings.model_fields.items()
        if not isinstance(field.json_schema_extra, dict) or "defines" not in field.json_schema_extra
    ]
    assert unmarked == []
    run, data = set(Settings.names_defining("run")), set(Settings.names_defining("data"))
    assert data <= run  # other shards are another run
    assert {"num_rounds", "strategy", "learning_rate", "seed"} <= run
    assert {"dataset", "partition", "num_shards", "seed", "dirichlet_alpha"} <= data
    assert not {"data_dir", "results_dir", "server_address", "connect_timeout", "log_level"} & run


def test_async_settings_define_only_an_async_run(tmp_path: Path) -> None:
    """Changing BUFFER_SIZE does not keep an unfinished sync run from resuming; in async it does."""
    from server.reporting.results import Results
    from server.training.rounds import Federation, changed_settings
    from server.transport.admission import BoundedClientManager
    from server.transport.wiring import Traffic

    def fingerprint(**values: object) -> dict:
        settings = Settings(**values)
        return Federation(settings, BoundedClientManager(1.0), Results(tmp_path), Traffic()).fingerprint

    assert changed_settings(fingerprint(), fingerprint(buffer_size=7, max_staleness=2)) == []
    assert "mode" in fingerprint() and "buffer_size" not in fingerprint()
    assert changed_settings(fingerprint(mode="async"), fingerprint(mode="async", buffer_size=7)) == ["BUFFER_SIZE"]
    assert changed_settings(fingerprint(), fingerprint(mode="async")) == ["MODE"]


def test_the_run_and_data_fingerprints_come_from_the_marks() -> None:
    from client.data.shards import data_settings
    from server.training.rounds import RUN_SETTINGS

    assert Settings.names_defining("run") == RUN_SETTINGS
    iid = data_settings(Settings())
    assert set(iid) == set(Settings.names_defining("data")) - {
        "dirichlet_alpha",
        "labels_per_client",
        "folder_path",
        "image_size",
        "image_channels",
        "classes",
        "synthetic_examples",
    }
    assert data_settings(Settings(partition="iid", dirichlet_alpha=0.1)) == iid  # unused: same shards
    assert data_settings(Settings(partition="dirichlet", dirichlet_alpha=0.1))["dirichlet_alpha"] == 0.1
    assert "labels_per_client" in data_settings(Settings(partition="pathological"))


def _just_outside(field: FieldInfo, bound: object) -> tuple[str, str]:
    """A value just outside one bound of a field, and a pattern for the words that state it."""
    whole = int in (get_args(field.annotation) or (field.annotation,))
    if isinstance(bound, Ge | Gt):
        low = bound.ge if isinstance(bound, Ge) else bound.gt
        value = (low - 1 if whole else math.nextafter(low, -math.inf)) if isinstance(bound, Ge) else low
        if isinstance(bound, Gt) and not whole:
            return repr(value), rf"> {low}\b"
        low = low if isinstance(bound, Ge) else low + 1
        return repr(value), rf"(>=|from) {low}\b"
    assert isinstance(bound, Le | Lt), bound
    high = bound.le if isinstance(bound, Le) else bound.lt
    value = (high + 1 if whole else math.nextafter(high, math.inf)) if isinstance(bound, Le) else high
    if isinstance(bound, Lt) and not whole:
        return repr(value), rf"< {high}\b"
    high = high if isinstance(bound, Le) else high - 1
    return repr(value), rf"(<=|to) {high}\b"


BOUNDED = [
    (name, *_just_outside(field, bound))
    for name, field in Settings.model_fields.items()
    for bound in field.metadata
    if isinstance(bound, Ge | Gt | Le | Lt)
]


def test_the_bounds_walk_covers_every_bounded_setting() -> None:
    assert {n for n, *_ in BOUNDED} >= {"num_rounds", "dirichlet_alpha", "trim_fraction", "seed", "connect_timeout"}


@pytest.mark.parametrize(("name", "value", "words"), BOUNDED, ids=[f"{n}={v}" for n, v, _ in BOUNDED])
def test_each_bound_is_refused_with_a_message_true_to_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: str
) -> None:
    """The value just outside each bound is refused, and the message states that very bound
    (DIRICHLET_ALPHA once said "a number > 0" while it refused 1000.1)."""
    monkeypatch.setenv(name.upper(), value)
    with pytest.raises(BadInput) as caught:
        Settings.load()
    message = str(caught.value)
    assert message.startswith(f"{name.upper()}={value!r} is not valid: use ")
    assert re.search(words, message.split(" is not valid: use ", 1)[1]), message


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"min_fit_clients": 4}, "MIN_FIT_CLIENTS=4 is above MIN_AVAILABLE_CLIENTS=3: set MIN_FIT_CLIENTS at or below"),
        ({"min_available_clients": 11}, "MIN_AVAILABLE_CLIENTS=11 is above MAX_CLIENTS=10: raise MAX_CLIENTS"),
        ({"dataset": "folder"}, "DATASET=folder needs FOLDER_PATH: set FOLDER_PATH"),
        ({"strategy": "krum", "krum_clients_to_keep": 3}, "KRUM_CLIENTS_TO_KEEP=3 is above MIN_FIT_CLIENTS=2"),
    ],
)
def test_every_settings_object_is_checked_not_only_those_from_load(values: dict, message: str) -> None:
    with pytest.raises(BadInput) as caught:
        Settings(**values)
    assert str(caught.value).startswith(message)
    assert str(caught.value).endswith("(in .env or the environment)")
