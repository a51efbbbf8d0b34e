"""Tasks: the model and training loop a client federates, as a plug-in (TASK, TASK_DIR).

A task is a module (or an object in one, `module:object`) with
- build_model(spec) -> nn.Module                        required
- train(model, data, config) -> {"loss": ..., ...}      optional: the built-in task's loop
- evaluate(model, data, config) -> {"loss": ..., ...}   optional: the built-in task's
- METRICS = {"f1": "ratio", "tokens": "number"}         optional: more metrics train/evaluate return
- predict_transform(images) -> tensor (N, C, H, W)      optional: `predict` on raw image files
client/tasks/builtin.py is the built-in one, and the example (docs/own-model.md).

This module is the only place that calls a task's functions: it checks what they return, and
turns every mistake of the task's into one line naming the task, what is wrong and the fix.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.data.images import ImageSpec
from shared.errors import BadInput
from shared.protocol import BUILTIN_TASK, MAX_TASK_METRICS, NOT_FINITE, TASK_METRIC_NAME, TASK_METRIC_TYPES

log = logging.getLogger("flowerpot.client")

BUILTIN_MODULE = "client.tasks.builtin"
# What train and evaluate may return without declaring it in METRICS: the loss (required), the
# accuracy (a ratio) and FedProx's term, which Flowerpot reports under names of its own.
KNOWN_METRICS = {"loss": "number", "accuracy": "ratio", "proximal_term": "number"}
DRY_BATCH = 2  # examples in the forward pass that checks a task at start


@dataclass(frozen=True)
class Data:
    """A split as the task gets it: x float32 (N, C, H, W), normalised with the data set's mean
    and std; y int64 (N,) labels in spec.class_names order. Both on config.device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Config:
    """What a round asks of train and evaluate. The seed is SEED's, made distinct per round (and
    per fit in async mode): the same run trains the same way."""

    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    round: int
    proximal_mu: float  # FedProx's mu (STRATEGY=fedprox), else 0: add proximal_term(model) to the loss
    # The global model's parameters as the round began, in model.parameters() order, detached.
    global_weights: list[torch.Tensor] = field(default_factory=list)
    device: str = "cpu"
    num_rounds: int = 0

    def proximal_term(self, model: nn.Module) -> torch.Tensor:
        """FedProx's (mu/2)·||w - w_global||² for `model` (0 when mu is 0): add it to the loss."""
        if self.proximal_mu <= 0 or not self.global_weights:
            return torch.zeros((), device=self.device)
        drift = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), self.global_weights))
        return 0.5 * self.proximal_mu * drift  # type: ignore[return-value]


def _diverged(model: nn.Module) -> bool:
    """The model's weights hold NaN or Inf."""
    with torch.no_grad():
        return not all(bool(torch.isfinite(p).all()) for p in model.parameters())


class TaskFailed(Exception):
    """The task's own train or evaluate raised: this answer fails, the client goes on."""


@dataclass(frozen=True)
class Task:
    """A loaded, checked task: its functions, and what it declared."""

    name: str  # TASK, "builtin" for the built-in one: what model files and joins record
    build_model: Callable[[Any], Any]
    train: Callable[[Any, Any, Any], Any] | None = None
    evaluate: Callable[[Any, Any, Any], Any] | None = None
    metrics: dict[str, str] = field(default_factory=dict)  # METRICS
    predict_transform: Callable[[Any], Any] | None = None

    def new_model(self, spec: ImageSpec, seed: int, device: str = "cpu") -> nn.Module:
        """The task's model, its weights drawn from `seed` (the same on every client), on `device`."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            try:
                model = self.build_model(spec)
            except Exception as exc:
                raise self._broken("build_model(spec)", exc) from None
        if not isinstance(model, nn.Module):
            raise BadInput(
                f"TASK={self.name}: build_model returned {type(model).__name__}, not a torch nn.Module: "
                "return the network (an nn.Module) from build_model"
            )
        return model.to(device)

    def check(self, spec: ImageSpec, seed: int, device: str = "cpu") -> nn.Module:
        """At start, before connecting: build the model and run one forward pass on a tiny batch.
        The model, or BadInput naming what is wrong."""
        model = self.new_model(spec, seed, device)
        if not any(True for _ in model.parameters()):
            raise BadInput(f"TASK={self.name}: build_model's network has no parameters: give it trainable layers")
        model.eval()
        try:
            with torch.no_grad():
                out = model(torch.zeros(DRY_BATCH, *spec.shape, device=device))
        except Exception as exc:
            raise self._broken(
                f"the model's forward pass on a batch of shape {(DRY_BATCH, *spec.shape)}", exc
            ) from None
        expected = (DRY_BATCH, spec.num_classes)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BadInput(
                f"TASK={self.name}: the model's output for {DRY_BATCH} images of shape {spec.shape} is {got}, "
                f"not {expected}: end the network with one logit per class (spec.num_classes={spec.num_classes})"
            )
        return model

    def fit(
        self, model: nn.Module, data: Data, config: Config, loop: Callable[[Any, Any, Any], Any] | None = None
    ) -> dict[str, float]:
        """train's metrics, checked; TaskFailed when it raised, BadInput when it broke the contract.
        `loop` trains in the task's place (DP=record's DP-SGD)."""
        run = loop or self.train or builtin_module().train
        torch.manual_seed(config.seed)  # the task's own randomness (dropout, ...) is the run's too
        model.train()
        try:
            result = run(model, data, config)
        except Exception as exc:
            raise TaskFailed(f"{exc.__class__.__name__}: {exc}") from exc
        return self._checked("train", result, config.round, _diverged(model))

    def score(self, model: nn.Module, data: Data, config: Config) -> dict[str, float]:
        """evaluate's metrics, checked like fit's."""
        run = self.evaluate or builtin_module().evaluate
        model.eval()
        try:
            result = run(model, data, config)
        except Exception as exc:
            raise TaskFailed(f"{exc.__class__.__name__}: {exc}") from exc
        return self._checked("evaluate", result, config.round, _diverged(model))

    def _checked(self, what: str, result: Any, round_: int, diverged: bool = False) -> dict[str, float]:
        where = f"TASK={self.name}: {what} returned"
        if not isinstance(result, dict):
            raise BadInput(f"{where} {type(result).__name__} in round {round_}: return a dict such as {{'loss': 0.3}}")
        if "loss" not in result:
            raise BadInput(f"{where} no 'loss' in round {round_} (only {sorted(map(str, result))}): add 'loss' to it")
        metrics: dict[str, float] = {}
        for key, value in result.items():
            kind = KNOWN_METRICS.get(key) or self.metrics.get(key)
            if kind is None:
                raise BadInput(
                    f"{where} the metric {key!r}, which METRICS does not declare: declare it, e.g. "
                    f"METRICS = {{{key!r}: 'number'}} (or 'ratio' for a value in [0, 1]), or do not return it"
                )
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, Real) or isinstance(value, bool):
                raise BadInput(
                    f"{where} {key}={value!r} ({type(value).__name__}) in round {round_}: return a number (a float)"
                )
            number = float(value)
            if not math.isfinite(number) and round_ > 0 and diverged:
                # The model's own weights are NaN or Inf (a poisoned global model, too high a
                # LEARNING_RATE): not the task's fault, so this answer fails, the client stays, and
                # the server, told why, rolls the unusable model back. A NaN loss of a finite
                # model is the task's bug, refused below.
                raise TaskFailed(f"{key}={number} in round {round_}: {NOT_FINITE}, the model diverged")
            if not math.isfinite(number):
                fix = "lower LEARNING_RATE if training diverges" if key == "loss" else "return a finite number"
                raise BadInput(f"{where} {key}={number} in round {round_}: {fix}, or fix the task")
            if kind == "ratio" and not 0.0 <= number <= 1.0:
                raise BadInput(
                    f"{where} {key}={number} in round {round_}, outside [0, 1] though it is a ratio: "
                    "return a fraction, or declare it as 'number' in METRICS"
                )
            metrics[key] = number
        return metrics

    def _broken(self, what: str, exc: Exception) -> BadInput:
        log.debug("TASK=%s: %s raised", self.name, what, exc_info=exc)
        return BadInput(
            f"TASK={self.name}: {what} raised {exc.__class__.__name__}: {exc}: fix the task "
            "(LOG_LEVEL=DEBUG shows its traceback)"
        )


def builtin_module() -> Any:
    return importlib.import_module(BUILTIN_MODULE)


def load_task(task: str = "", task_dir: Path | None = None) -> Task:
    """The task TASK names (empty: the built-in one), imported with TASK_DIR first on the import
    path; BadInput naming the task, what is wrong and the fix."""
    name = task or BUILTIN_TASK
    module_name, _, object_path = (task or BUILTIN_MODULE).partition(":")
    if task_dir is not None:
        if not task_dir.is_dir():
            raise BadInput(f"TASK_DIR={task_dir} is not a folder: point it at the folder that holds {module_name}.py")
        folder = str(task_dir.resolve())
        if folder not in sys.path:
            sys.path.insert(0, folder)
    module = _import(name, module_name, task_dir)
    source: Any = module
    for part in object_path.split(".") if object_path else ():
        if not hasattr(source, part):
            raise BadInput(
                f"TASK={name}: the module {module_name} has no {object_path}: "
                f"name an object of it (TASK={module_name}:OBJECT), or the module alone"
            )
        source = getattr(source, part)
    functions = {key: getattr(source, key, None) for key in ("build_model", "train", "evaluate", "predict_transform")}
    if functions["build_model"] is None:
        raise BadInput(
            f"TASK={name} has no build_model: define build_model(spec) returning an nn.Module "
            f"(see {BUILTIN_MODULE.replace('.', '/')}.py)"
        )
    for key, function in functions.items():
        if function is not None and not callable(function):
            raise BadInput(f"TASK={name}: its {key} is a {type(function).__name__}, not a function: make it one")
    return Task(
        name=name,
        build_model=functions["build_model"],
        train=functions["train"],
        evaluate=functions["evaluate"],
        metrics=declared_metrics(name, getattr(source, "METRICS", None)),
        predict_transform=functions["predict_transform"],
    )


def _import(name: str, module_name: str, task_dir: Path | None) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(f"{missing}."):
            where = f"TASK_DIR={task_dir}" if task_dir is not None else "the import path (set TASK_DIR to its folder)"
            raise BadInput(
                f"TASK={name} cannot be imported: no module {missing} in {where}: "
                f"put {module_name.replace('.', '/')}.py there, or correct TASK"
            ) from None
        log.debug("TASK=%s: importing %s failed", name, module_name, exc_info=exc)
        raise BadInput(
            f"TASK={name} needs the package {missing}, which is not installed: add it to a requirements.txt "
            "beside the module, in a folder under tasks/ for the client image to install it when built "
            "(docs/own-model.md), or install it"
        ) from None
    except Exception as exc:  # the user's module raised: its line, not Flowerpot's traceback
        log.debug("TASK=%s: importing %s raised", name, module_name, exc_info=exc)
        raise BadInput(
            f"TASK={name} raised {exc.__class__.__name__} on import: {exc}: fix the module "
            "(LOG_LEVEL=DEBUG shows its traceback)"
        ) from None


def declared_metrics(name: str, metrics: Any) -> dict[str, str]:
    """METRICS, checked: at most MAX_TASK_METRICS names, each a short identifier that is not one
    of Flowerpot's own, of a known type."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise BadInput(
            f"TASK={name}: METRICS is a {type(metrics).__name__}, not a dict: "
            "write METRICS = {'f1': 'ratio', 'tokens': 'number'}"
        )
    if len(metrics) > MAX_TASK_METRICS:
        raise BadInput(f"TASK={name}: METRICS declares {len(metrics)} metrics: declare at most {MAX_TASK_METRICS}")
    types = " or ".join(repr(t) for t in TASK_METRIC_TYPES)
    for key, kind in metrics.items():
        if not isinstance(key, str) or not TASK_METRIC_NAME.fullmatch(key) or key in KNOWN_METRICS:
            raise BadInput(
                f"TASK={name}: METRICS names the metric {key!r}: use a lowercase name of letters, digits and _ "
                f"(at most 32), other than {', '.join(KNOWN_METRICS)}"
            )
        if kind not in TASK_METRIC_TYPES:
            raise BadInput(
                f"TASK={name}: METRICS gives {key} the unknown type {kind!r}: use {types} "
                "('ratio' for a value in [0, 1])"
            )
    return dict(metrics)


def to_data(x: np.ndarray, y: np.ndarray, spec: ImageSpec, device: str = "cpu") -> Data:
    """uint8 images (N, C, H, W) and labels as the task gets them."""
    return Data(to_input(x, spec).to(device), torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device))


def to_input(x: np.ndarray, spec: ImageSpec) -> torch.Tensor:
    """uint8 images (N, C, H, W) to the normalised float tensor the model expects."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (torch.from_numpy(np.ascontiguousarray(x)).float() / 255.0 - mean) / std


def get_weights(model: nn.Module) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    """Load arrays in state_dict order; ValueError when their number or shapes do not fit."""
    state = model.state_dict()
    if len(weights) != len(state):
        raise ValueError(f"got {len(weights)} arrays for a model of {len(state)}")
    new_state = {}
    for (name, current), array in zip(state.items(), weights):
        if tuple(array.shape) != tuple(current.shape):
            raise ValueError(f"array for {name} has shape {tuple(array.shape)}, expected {tuple(current.shape)}")
        new_state[name] = torch.as_tensor(np.asarray(array), dtype=current.dtype)
    model.load_state_dict(new_state, strict=True)


def global_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters as they are now, detached: the global weights of a round."""
    return [p.detach().clone() for p in model.parameters()]


def model_layout(model: nn.Module) -> str:
    """The shapes and dtypes of the model's arrays, in a few words: part of what a client says
    when it joins (the server compares it, never reads it), so that two sites with models of
    other shapes are told so by name before any training."""
    arrays = [(list(t.shape), str(t.dtype).removeprefix("torch.")) for t in model.state_dict().values()]
    digest = hashlib.sha256(json.dumps(arrays).encode()).hexdigest()[:12]
    count = sum(int(np.prod(shape)) for shape, _ in arrays)
    return f"{len(arrays)} arrays, {count} values, layout {digest}"


@torch.no_grad()
def predict_proba(model: nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Class probabilities (N, classes) for normalised inputs."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat(
        [
            torch.softmax(model(inputs[i : i + batch_size].to(device)), 1).cpu()
            for i in range(0, len(inputs), batch_size)
        ]
    ).numpy()


def train_arrays(
    task: Task,
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    spec: ImageSpec,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    proximal_mu: float = 0.0,
) -> dict[str, float]:
    """One local training on uint8 images, outside a federation (the benchmark's baselines)."""
    config = Config(epochs, batch_size, lr, seed, 0, proximal_mu, global_parameters(model))
    return task.fit(model, to_data(x, y, spec), config)


def evaluate_arrays(task: Task, model: nn.Module, x: np.ndarray, y: np.ndarray, spec: ImageSpec) -> dict[str, float]:
    """The task's evaluation on uint8 images: {"loss": ..., "accuracy": ..., ...}."""
    return task.score(model, to_data(x, y, spec), Config(1, 1, 0.0, 0, 0, 0.0))
