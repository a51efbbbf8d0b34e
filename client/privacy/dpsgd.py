"""DP-SGD (Abadi et al. 2016) for a site's local training: DP=record.

Each step samples a batch by Poisson sampling (every training example joins with probability
q = BATCH_SIZE / examples, so batch sizes vary), computes each example's gradient (Opacus'
GradSampleModule), clips each to L2 norm DP_CLIP_NORM, sums them, adds Gaussian noise of standard
deviation DP_NOISE_MULTIPLIER x DP_CLIP_NORM and divides by the expected batch size q x examples;
then the built-in task's SGD step with momentum 0.9 (post-processing: free of privacy cost), and
FedProx's term, whose gradient reads no record, added after the noise.

The sampling and the noise come from the operating system's secure random source
(shared/secure_random.py), never from SEED. Opacus' own secure mode needs torchcsprng, which no
longer builds against current PyTorch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from client.privacy.ledger import steps_per_epoch
from client.tasks.builtin import sgd_step
from shared import secure_random
from shared.errors import BadInput

log = logging.getLogger("flowerpot.client")

# Divides every norm before clipping, so that an all-zero gradient is not 0/0.
_TINY = 1e-12


@dataclass(frozen=True)
class Mechanism:
    """What one private fit releases: its noise, clipping and sampling, and its steps."""

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    steps: int


def mechanism(examples: int, epochs: int, batch_size: int, noise_multiplier: float, clip_norm: float) -> Mechanism:
    per_epoch = steps_per_epoch(examples, batch_size)
    return Mechanism(noise_multiplier, clip_norm, min(1.0, batch_size / examples), epochs * per_epoch)


def check_private(model: nn.Module, task: str) -> None:
    """A model DP-SGD can train, or BadInput naming its first layer that it cannot (BatchNorm
    mixes the examples of a batch, so one example's gradient is not its own)."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    for name, module in model.named_modules():
        if any(True for _ in module.children()):
            continue  # a container: its layers are checked one by one
        mode = module.training
        module.train()  # Opacus checks training-mode models; the mode is the task's again below
        try:
            problems = [*ModuleValidator.validate(module, strict=False), *GradSampleModule.validate(module)]
        finally:
            module.train(mode)
        if problems:
            kind = type(module).__name__
            fix = (
                "use GroupNorm (or LayerNorm, InstanceNorm) instead"
                if "Norm" in kind
                else "replace it with a layer Opacus supports"
            )
            raise BadInput(
                f"DP=record: TASK={task}'s model has the layer {name or 'model'} ({kind}), which DP-SGD cannot "
                f"train ({str(problems[0]).split('.')[0]}): {fix}, or set DP=off"
            )


def gaussian_noise(shape: torch.Size, std: float) -> torch.Tensor:
    """N(0, std^2) of `shape` from the secure source (shared/secure_random.py), as float32."""
    return torch.from_numpy(secure_random.gaussian(tuple(shape), std)).float()


def poisson_batch(examples: int, sample_rate: float) -> torch.Tensor:
    """The indices of one Poisson-sampled batch: each example with probability `sample_rate`."""
    return torch.from_numpy(np.flatnonzero(secure_random.bernoulli(examples, sample_rate)))


def clipped_sum(per_example: list[torch.Tensor], clip_norm: float) -> list[torch.Tensor]:
    """Each example's gradient (first dimension: the examples) clipped to L2 norm `clip_norm`
    over all parameters together, summed over the examples."""
    norms = torch.sqrt(sum(g.reshape(len(g), -1).pow(2).sum(1) for g in per_example))  # type: ignore[arg-type]
    factor = (clip_norm / (norms + _TINY)).clamp(max=1.0)
    return [torch.einsum("i,i...->...", factor, g) for g in per_example]


def train(model: nn.Module, data: Any, config: Any, noise_multiplier: float, clip_norm: float) -> dict[str, float]:
    """DP-SGD on data.x, data.y for config.epochs epochs of Poisson-sampled batches; the metrics
    train reports (the loss and accuracy of the sampled examples, computed on private data)."""
    from opacus import GradSampleModule

    plan = mechanism(len(data), config.epochs, config.batch_size, noise_multiplier, clip_norm)
    wrapped = GradSampleModule(model, loss_reduction="sum", strict=True)
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    anchors = [a for p, a in zip(model.parameters(), config.global_weights) if p.requires_grad]
    velocity = [torch.zeros_like(p) for p in params]
    sizes = [p.numel() for p in params]
    size = sum(sizes)
    expected_batch = plan.sample_rate * len(data)
    total_loss, correct, seen = 0.0, 0, 0
    try:
        wrapped.train()
        for _ in range(plan.steps):
            idx = poisson_batch(len(data), plan.sample_rate).to(data.y.device)
            summed = [torch.zeros_like(p) for p in params]
            if len(idx):
                logits = wrapped(data.x[idx])
                loss = F.cross_entropy(logits, data.y[idx], reduction="sum")
                wrapped.zero_grad(set_to_none=True)
                loss.backward()
                summed = clipped_sum([p.grad_sample for p in params], clip_norm)  # type: ignore[attr-defined]
                total_loss += loss.item()
                correct += int((logits.argmax(1) == data.y[idx]).sum().item())
                seen += len(idx)
            # One draw per step for every parameter at once: the secure source's cost is per call.
            noise = gaussian_noise(torch.Size([size]), noise_multiplier * clip_norm).split(sizes)
            for i, (p, s, n) in enumerate(zip(params, summed, noise)):
                p.grad = (s + n.view(p.shape).to(p.device)) / expected_batch
                if config.proximal_mu > 0 and anchors:  # FedProx: (mu/2)||w - w_global||^2's gradient
                    p.grad += config.proximal_mu * (p.detach() - anchors[i])
                p.grad_sample = None  # type: ignore[attr-defined]
            sgd_step(params, velocity, config.learning_rate)
    finally:
        wrapped._close()  # the model as it was: no hooks, no per-example gradients
        model.zero_grad(set_to_none=True)
    return {"loss": total_loss / max(1, seen), "accuracy": correct / max(1, seen)}
