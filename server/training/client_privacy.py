"""Client-level differential privacy (DP=client): DP-FedAvg (McMahan et al. 2018, "Learning
differentially private recurrent language models"), protecting each client's whole data.

Each round samples every connected client independently with probability FRACTION_FIT from the
secure source (Poisson sampling, server/transport/admission.py); each sampled update's distance
from the global model is clipped to DP_CLIP_NORM; the clipped updates are averaged with equal
weights over the expected number of sampled clients (FRACTION_FIT x the connected ones: the
fixed-denominator estimator, so that an absent or refused update never raises another's weight),
and Gaussian noise of DP_NOISE_MULTIPLIER x DP_CLIP_NORM over that same denominator is added. One
client added or removed moves the sum by at most DP_CLIP_NORM, so each round is the subsampled
Gaussian mechanism, composed over the rounds by Google's dp-accounting (RDP).

Not Flower's DifferentialPrivacyServerSideFixedClipping: it draws its noise from numpy's global
generator (neither secure nor unseeded), divides by a fixed number of sampled clients that
Poisson sampling does not have, and drops every round with a failure, which the guard's refusals
are.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np

from shared import secure_random
from shared.errors import BadInput
from shared.settings import Settings

log = logging.getLogger("flowerpot.server")

ACCOUNTANT = "dp_accounting.rdp.RdpAccountant"
# Rényi orders: dp-accounting's fractional orders below 2 fail to converge at large sampling rates
# and are then left out with a warning; integer orders from 2 bound epsilon as tightly here.
ORDERS = [2 + i * 0.5 for i in range(0, 36)] + list(range(20, 257, 4))


def accountant_name() -> str:
    return f"{ACCOUNTANT} (dp-accounting {version('dp-accounting')})"


@dataclass(frozen=True)
class ClientLevel:
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    delta: float

    @classmethod
    def from_settings(cls, s: Settings) -> ClientLevel | None:
        if s.dp != "client":
            return None
        return cls(s.dp_noise_multiplier, s.dp_clip_norm, s.fraction_fit, s.dp_delta)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at delta after `rounds` rounds (0 for none)."""
        if rounds <= 0:
            return 0.0
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        accountant = RdpAccountant(orders=ORDERS)
        event = dp_accounting.PoissonSampledDpEvent(
            self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )
        accountant.compose(event, rounds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(accountant.get_epsilon(self.delta))

    def check_budget(self, rounds: int, budget: float | None) -> float:
        """The epsilon the run's `rounds` will spend; BadInput when it passes the budget, naming
        the rounds that fit."""
        planned = self.epsilon(rounds)
        if budget is None or planned <= budget:
            return planned
        fit = max((r for r in range(rounds) if self.epsilon(r) <= budget), default=0)
        raise BadInput(
            f"DP_EPSILON_BUDGET={budget:g}: NUM_ROUNDS={rounds} at FRACTION_FIT={self.sample_rate:g} and "
            f"DP_NOISE_MULTIPLIER={self.noise_multiplier:g} spend epsilon {planned:.3f} at delta {self.delta:g}: "
            f"set NUM_ROUNDS at most {fit}, or raise DP_NOISE_MULTIPLIER"
        )

    def noised(self, center: np.ndarray, mean: np.ndarray, counted: int, connected: int) -> np.ndarray:
        """The round's new global model (flat): `mean` is the equal-weight mean of `counted`
        clipped updates around `center`; their sum over the expected sampled clients, plus the
        noise."""
        expected = max(self.sample_rate * connected, 1e-12)
        step = (mean - center) * (counted / expected)
        noise = secure_random.gaussian(center.shape, self.noise_multiplier * self.clip_norm / expected)
        return center + step + noise


def planned_line(dp: ClientLevel, rounds: int, epsilon: float) -> str:
    return (
        f"DP=client: every round samples each client with probability {dp.sample_rate:g} from a secure source, "
        f"clips updates to {dp.clip_norm:g} and adds noise of {dp.noise_multiplier:g} x that; {rounds} rounds "
        f"spend epsilon {epsilon:.3f} at delta {dp.delta:g} ({accountant_name()})"
    )
