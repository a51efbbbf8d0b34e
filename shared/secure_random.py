"""Randomness that differential privacy rests on: from the operating system's secure source
(os.urandom), never from SEED, which everyone in the federation shares in .env and could use to
replay the noise and subtract it. Numpy only: the server, which holds no torch, uses it too.
"""

from __future__ import annotations

import math
import os

import numpy as np


def uniform(count: int) -> np.ndarray:
    """`count` doubles uniform in (0, 1), 53 random bits each."""
    words = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
    return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def standard_normal(count: int) -> np.ndarray:
    """`count` standard normal doubles, by Box-Muller from secure uniforms."""
    pairs = (count + 1) // 2
    u1, u2 = uniform(pairs), uniform(pairs)
    radius = np.sqrt(-2.0 * np.log(u1))
    return np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:count]


def gaussian(shape: tuple[int, ...], std: float) -> np.ndarray:
    """N(0, std^2) of `shape`, each coordinate the halved sum of 4 secure standard normals (as
    Opacus' secure mode draws it, against floating-point attacks on the noise: Holohan and
    Braghin 2021)."""
    count = math.prod(shape)
    return (standard_normal(4 * count).reshape(4, count).sum(axis=0) * (std / 2.0)).reshape(shape)


def bernoulli(count: int, rate: float) -> np.ndarray:
    """`count` independent draws, each True with probability `rate` (Poisson sampling)."""
    return uniform(count) < rate
