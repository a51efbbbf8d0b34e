"""The benchmark's attacking client (bench/attacker.py): each attack as the literature defines it."""

from __future__ import annotations

import numpy as np

from bench.attacker import attacked_update, flipped_labels
from bench.robustness import configurations
from shared.settings import Settings

GLOBAL = [np.ones((2, 2), np.float32), np.zeros(3, np.float32)]
TRAINED = [np.full((2, 2), 1.5, np.float32), np.full(3, -0.5, np.float32)]


def test_signflip_sends_the_update_reversed_and_scaled() -> None:
    sent = attacked_update("signflip", GLOBAL, TRAINED, 10.0, 0.0, seed=1)
    assert np.allclose(sent[0], 1 - 10 * 0.5) and np.allclose(sent[1], 5.0)
    assert [a.dtype for a in sent] == [np.float32, np.float32]


def test_gaussian_sends_noise_around_the_global_model_whatever_it_trained() -> None:
    sent = attacked_update("gaussian", GLOBAL, TRAINED, 1.0, 200.0, seed=1)
    noise = np.concatenate([(s - g).ravel() for s, g in zip(sent, GLOBAL)])
    assert 20 < noise.std() < 1000 and sent[0].dtype == np.float32
    assert all(np.array_equal(a, b) for a, b in zip(sent, attacked_update("gaussian", GLOBAL, TRAINED, 1.0, 200.0, 1)))


def test_labelflip_poisons_the_labels_and_sends_what_it_trained() -> None:
    assert flipped_labels(np.array([0, 1, 9]), 10).tolist() == [9, 8, 0]
    assert attacked_update("labelflip", GLOBAL, TRAINED, 10.0, 200.0, seed=1) is TRAINED


def test_every_benchmark_configuration_is_valid_settings() -> None:
    for clients, most in ((10, 3), (5, 1)):
        for config in configurations(clients, most).values():
            values = {k.lower(): v for k, v in config.items()}
            Settings(min_fit_clients=clients, min_available_clients=clients, max_clients=10, **values)
