"""The built-in task (TASK empty): a small CNN and its training loop, written to the task contract.

It is also the example to copy: a task of your own is a module like this one in a folder of
yours (docs/own-model.md). Flowerpot calls
- build_model(spec): the network for images of spec.shape == (C, H, W) and spec.num_classes
  classes (spec.class_names in label order). Flowerpot seeds torch before it calls it, so every
  client builds the same starting weights;
- train(model, data, config): local training on data.x (float32 (N, C, H, W), normalised) and
  data.y (int64 (N,)); returns {"loss": ...} and optionally more metrics. A task without train
  is trained by this module's train;
- evaluate(model, data, config): {"loss": ..., "accuracy": ...} on the client's test split.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("flowerpot.client")

EVALUATE_BATCH = 512  # examples per forward pass in evaluate: bounds its memory, not its result


class Net(nn.Module):
    """Two 3x3 conv blocks (pooling while the image is at least 4 px) and a two-layer head."""

    def __init__(self, spec: Any, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, height, width_px = spec.shape
        size = min(height, width_px)
        for out in (width, 2 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU()]
            if size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = out
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *spec.shape)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, spec.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(spec: Any) -> nn.Module:
    return Net(spec)


def train(model: nn.Module, data: Any, config: Any) -> dict[str, float]:
    """SGD with momentum 0.9; with config.proximal_mu > 0 (FedProx) adds (mu/2)·||w - w_global||².
    The loss reported is the data loss (cross-entropy), also under FedProx, so that it compares
    across strategies; FedProx's term is reported on its own as proximal_term."""
    inputs, targets = data.x, data.y
    params: list[torch.Tensor] = list(model.parameters())
    anchor = config.global_weights if config.proximal_mu > 0 else None
    velocity = [torch.zeros_like(p) for p in params]
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    total_loss, total_proximal, correct, seen = 0.0, 0.0, 0, 0
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(targets), generator=generator).to(targets.device)
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            logits = model(inputs[idx])
            loss = data_loss = F.cross_entropy(logits, targets[idx])
            if anchor is not None:
                drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                proximal = 0.5 * config.proximal_mu * drift
                loss = data_loss + proximal
                total_proximal += proximal.item() * len(idx)
            model.zero_grad(set_to_none=True)
            loss.backward()
            sgd_step(params, velocity, config.learning_rate)
            total_loss += data_loss.item() * len(idx)
            correct += (logits.argmax(1) == targets[idx]).sum().item()
            seen += len(idx)
        log.debug("local epoch %d/%d: mean loss so far %.4f, accuracy %.4f", epoch, config.epochs, total_loss / seen,
                  correct / seen)  # fmt: skip
    metrics = {"loss": total_loss / seen, "accuracy": correct / seen}
    if anchor is not None:
        metrics["proximal_term"] = total_proximal / seen
    return metrics


@torch.no_grad()
def sgd_step(params: list[torch.Tensor], velocity: list[torch.Tensor], lr: float, momentum: float = 0.9) -> None:
    """torch.optim.SGD(momentum=0.9)'s update, written out: the first optimizer step would import
    torch._dynamo, about 70 MB more memory in every client process."""
    for p, v in zip(params, velocity):
        if p.grad is None:  # a parameter the loss does not reach
            continue
        v.mul_(momentum).add_(p.grad)
        p.sub_(v, alpha=lr)


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, config: Any) -> dict[str, float]:
    model.eval()
    inputs, targets = data.x, data.y
    total_loss, correct = 0.0, 0
    for start in range(0, len(targets), EVALUATE_BATCH):
        logits = model(inputs[start : start + EVALUATE_BATCH])
        batch = targets[start : start + EVALUATE_BATCH]
        total_loss += F.cross_entropy(logits, batch, reduction="sum").item()
        correct += (logits.argmax(1) == batch).sum().item()
    return {"loss": total_loss / len(targets), "accuracy": correct / len(targets)}
