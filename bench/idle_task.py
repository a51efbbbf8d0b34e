"""A task that trains and evaluates nothing (TASK=bench.idle_task): the cross-device capacity rows
measure what the framework costs per connected client, not training. Its model is the built-in
CNN, so that every message has the real model's size."""

from __future__ import annotations

from typing import Any

from client.tasks.builtin import build_model

__all__ = ["build_model", "evaluate", "train"]


def train(model: Any, data: Any, config: Any) -> dict[str, float]:
    return {"loss": 0.0}


def evaluate(model: Any, data: Any, config: Any) -> dict[str, float]:
    return {"loss": 0.0, "accuracy": 0.0}
