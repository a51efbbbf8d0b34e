"""Local training and evaluation of the model on one shard (plain PyTorch, no Flower)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from client.data.images import ImageSpec
from client.model import to_input

log = logging.getLogger("flowerpot.client")


@dataclass
class Outcome:
    loss: float  # the data loss (cross-entropy), also under FedProx: comparable across strategies
    accuracy: float
    examples: int
    proximal: float = 0.0  # FedProx's (mu/2)·||w - w_global||², averaged like the loss; 0 without it


def train(
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
) -> Outcome:
    """SGD with momentum 0.9; with proximal_mu > 0 adds FedProx's (mu/2)·||w - w_global||²."""
    inputs, targets = to_input(x, spec), torch.from_numpy(y)
    params = list(model.parameters())
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    velocity = [torch.zeros_like(p) for p in params]
    generator = torch.Generator().manual_seed(seed)
    model.train()
    total_loss, total_proximal, correct, seen = 0.0, 0.0, 0, 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            logits = model(inputs[idx])
            loss = data_loss = F.cross_entropy(logits, targets[idx])
            if anchor is not None:
                drift = sum((((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor)), torch.zeros(()))
                proximal = 0.5 * proximal_mu * drift
                loss = data_loss + proximal
                total_proximal += proximal.item() * len(idx)
            model.zero_grad(set_to_none=True)
            loss.backward()
            sgd_step(params, velocity, lr)
            total_loss += data_loss.item() * len(idx)
            correct += (logits.argmax(1) == targets[idx]).sum().item()
            seen += len(idx)
        log.debug("local epoch %d/%d: mean loss so far %.4f, accuracy %.4f", epoch, epochs, total_loss / seen,
                  correct / seen)  # fmt: skip
    return Outcome(
        loss=total_loss / seen, accuracy=correct / seen, examples=len(targets), proximal=total_proximal / seen
    )


@torch.no_grad()
def sgd_step(
    params: Sequence[torch.Tensor], velocity: Sequence[torch.Tensor], lr: float, momentum: float = 0.9
) -> None:
    """torch.optim.SGD(momentum=0.9)'s update, written out: the first optimizer step would import
    torch._dynamo, about 70 MB more memory in every client process."""
    for p, v in zip(params, velocity):
        if p.grad is None:  # a parameter the loss does not reach: no step (as torch.optim.SGD)
            continue
        v.mul_(momentum).add_(p.grad)
        p.sub_(v, alpha=lr)


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray, spec: ImageSpec, batch_size: int = 512) -> np.ndarray:
    """Class probabilities (N, classes) for uint8 images."""
    model.eval()
    inputs = to_input(x, spec)
    return torch.cat(
        [F.softmax(model(inputs[i : i + batch_size]), 1) for i in range(0, len(inputs), batch_size)]
    ).numpy()


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, spec: ImageSpec, batch_size: int = 512) -> Outcome:
    model.eval()
    inputs, targets = to_input(x, spec), torch.from_numpy(y)
    total_loss, correct = 0.0, 0
    for start in range(0, len(targets), batch_size):
        logits = model(inputs[start : start + batch_size])
        batch = targets[start : start + batch_size]
        total_loss += F.cross_entropy(logits, batch, reduction="sum").item()
        correct += (logits.argmax(1) == batch).sum().item()
    return Outcome(loss=total_loss / len(targets), accuracy=correct / len(targets), examples=len(targets))
