"""The small CNN that clients train, shaped by the data set's ImageSpec (needs torch)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from client.data.images import ImageSpec


class Net(nn.Module):
    """Two 3x3 conv blocks (pooling while the image is at least 4 px) and a two-layer head."""

    def __init__(self, spec: ImageSpec, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = spec.channels, min(spec.height, spec.width)
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


def build_model(spec: ImageSpec, seed: int) -> Net:
    """The same seed gives the same initial weights on every client."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Net(spec)


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


def to_input(x: np.ndarray, spec: ImageSpec) -> torch.Tensor:
    """uint8 images (N, C, H, W) to the normalised float tensor the model expects."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (torch.from_numpy(np.ascontiguousarray(x)).float() / 255.0 - mean) / std
