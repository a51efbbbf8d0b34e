"""The benchmark's attacking client (bench/attacker.py): each attack as the literature defines it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

from bench.attacker import (
    Collusion,
    alie,
    alie_z,
    attack_success_rate,
    attacked_update,
    backdoor_data,
    flat,
    flipped_labels,
    ipm,
    min_max_or_sum,
)
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
    for clients, most in ((10, 2), (10, 3), (5, 1)):
        for config in configurations(clients, most).values():
            values = {k.lower(): v for k, v in config.items()}
            Settings(min_fit_clients=clients, min_available_clients=clients, max_clients=10, **values)


def test_gaussian_by_default_has_the_norm_of_the_attackers_own_update() -> None:
    sent = attacked_update("gaussian", GLOBAL, TRAINED, 1.0, 0.0, seed=1)  # sigma 0: matched
    honest = np.linalg.norm(flat(TRAINED) - flat(GLOBAL))
    assert 0.3 * honest < np.linalg.norm(flat(sent) - flat(GLOBAL)) < 3 * honest


BENIGN = np.array([[1.0, 2.0, 0.0], [3.0, 2.0, 1.0], [2.0, 5.0, 2.0]])


def test_alie_moves_the_mean_by_z_max_standard_deviations() -> None:
    # Baruch et al.: n = 10, f = 2: s = 6 - 2 = 4, z = Phi^-1(6 / 10) = 0.2533; n = 50, f = 12: s = 14
    assert round(alie_z(10, 2), 4) == 0.2533 and round(alie_z(50, 12), 2) == round(NormalDist().inv_cdf(36 / 50), 2)
    assert np.allclose(alie(BENIGN, 10, 2), BENIGN.mean(0) - alie_z(10, 2) * BENIGN.std(0))


def test_ipm_sends_minus_epsilon_times_the_benign_mean() -> None:
    assert np.allclose(ipm(BENIGN, 0.1), -0.1 * BENIGN.mean(0))


def test_min_max_and_min_sum_stay_at_the_largest_gamma_the_benign_spread_allows() -> None:
    pairwise = np.linalg.norm(BENIGN[:, None] - BENIGN[None], axis=2)
    for kind in ("std", "unit", "sign"):
        worst = min_max_or_sum(BENIGN, kind, "minmax")
        assert np.linalg.norm(BENIGN - worst, axis=1).max() == pytest.approx(pairwise.max(), rel=1e-3)
        summed = min_max_or_sum(BENIGN, kind, "minsum")
        assert np.square(np.linalg.norm(BENIGN - summed, axis=1)).sum() == pytest.approx(
            np.square(pairwise).sum(1).max(), rel=1e-3
        )
        assert np.allclose(worst, BENIGN.mean(0) + (worst - BENIGN.mean(0)))  # along the perturbation


def test_backdoor_adds_triggered_copies_and_scales_its_model_to_replace_the_average() -> None:
    x = np.zeros((4, 1, 8, 8), np.uint8)
    y = np.array([0, 1, 2, 0])
    bx, by = backdoor_data(x, y, target=0)
    assert len(by) == 6 and by[4:].tolist() == [0, 0] and (bx[4:, :, -2:, -2:] == 255).all()
    assert (bx[:4] == 0).all()  # its own data stays as it was
    sent = attacked_update("backdoor", GLOBAL, TRAINED, 10.0, 0.0, seed=1)
    assert np.allclose(flat(sent) - flat(GLOBAL), 10 * (flat(TRAINED) - flat(GLOBAL)))

    def all_target(images: np.ndarray) -> np.ndarray:
        return np.zeros(len(images), int)

    assert attack_success_rate(all_target, x, y, 0) == (2, 2)  # only images not of the target count


def test_colluders_see_each_others_updates_of_the_round(tmp_path: Path) -> None:
    a, b = Collusion(tmp_path, 2, timeout=5), Collusion(tmp_path, 2, timeout=5)
    with ThreadPoolExecutor(2) as pool:
        seen = list(pool.map(lambda c: c[0].share(3, c[1], np.full(2, c[2])), [(a, "s0", 1.0), (b, "s1", 2.0)]))
    assert all(sorted(s[:, 0].tolist()) == [1.0, 2.0] for s in seen)
    alone = Collusion(tmp_path / "alone", 2, timeout=0.1).share(1, "s0", np.ones(2))
    assert alone.shape == (1, 2)  # the other never came: what there is, after the timeout
