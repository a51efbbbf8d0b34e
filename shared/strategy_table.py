"""The strategies STRATEGY may name, in one table: each one's Flower class, its knobs, and what the
rest of the code must know about it. Settings validation (its rules), the guard (which builds the
Flower class with its knobs) and the async loop (its server step, its one update per client) all
read it, so adding a strategy is one entry here.

No flwr import: the settings, and every command that reads them, stay light; the guard looks the
class up by name in `flwr.server.strategy`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.settings import Settings

Knobs = dict[str, float | None]  # keyword arguments of the Flower class; None keeps Flower's default
Rule = tuple[bool, str, str]  # (holds, the problem when it does not, the fix): as in Settings


@dataclass(frozen=True)
class StrategyKind:
    flower: str  # the class's name in flwr.server.strategy
    knobs: Callable[[Settings], Knobs] = lambda s: {}
    # Server-optimizer defaults, used when SERVER_LEARNING_RATE / TAU are empty (see below).
    tuned: dict[str, float] = field(default_factory=dict)
    # A server optimizer of its own: SERVER_LEARNING_RATE is already its step size (async mode
    # applies no step of its own on top).
    own_server_step: bool = False
    # Robust aggregators count updates against an assumed minority of bad ones: an async buffer
    # holds at most one update per client for them.
    robust: bool = False
    # Settings under which it cannot do its job at all: refused by Settings, naming both variables.
    rules: Callable[[Settings], list[Rule]] = lambda s: []
    # What the operator should know when it runs but cannot do its job at this client count.
    weakness: Callable[[Settings], str | None] = lambda s: None


def _fedopt(moments: bool) -> Callable[[Settings], Knobs]:
    """FedAdam and FedYogi (with moments beta_1, beta_2), FedAdagrad: an empty SERVER_LEARNING_RATE
    or TAU takes the strategy's tuned value."""

    def knobs(s: Settings) -> Knobs:
        tuned = STRATEGIES[s.strategy].tuned
        eta = s.server_learning_rate if s.server_learning_rate is not None else tuned.get("eta")
        values: Knobs = {"eta": eta, "tau": s.tau if s.tau is not None else tuned.get("tau"), "eta_l": s.learning_rate}
        if moments:
            values.update(beta_1=s.beta_1, beta_2=s.beta_2)
        return values

    return knobs


def _raise_it(s: Settings) -> str:
    """What sets how many updates are aggregated at once: in async mode the buffer's."""
    return "BUFFER_SIZE" if s.mode == "async" else "MIN_FIT_CLIENTS (and MIN_AVAILABLE_CLIENTS)"


def _krum_rules(s: Settings) -> list[Rule]:
    aggregated, per_step = s.updates_per_aggregation
    raise_it = _raise_it(s)
    return [
        (
            s.krum_clients_to_keep <= aggregated,
            f"KRUM_CLIENTS_TO_KEEP={s.krum_clients_to_keep} is above {per_step}={aggregated}",
            f"keep at most {per_step} updates",
        ),
        # A robust aggregator that cannot defend at this client count is refused rather than run
        # as a plain average.
        (
            aggregated >= 2 * s.krum_malicious_clients + 3,
            f"STRATEGY=krum needs {per_step} >= 2*KRUM_MALICIOUS_CLIENTS+3 = "
            f"{2 * s.krum_malicious_clients + 3}, but {per_step}={aggregated}",
            f"raise {raise_it} or lower KRUM_MALICIOUS_CLIENTS",
        ),
    ]


def _bulyan_rules(s: Settings) -> list[Rule]:
    # El Mhamdi et al. 2018: Bulyan's guarantee needs n >= 4f + 3 (Flower refuses fewer too).
    aggregated, per_step = s.updates_per_aggregation
    need = 4 * s.krum_malicious_clients + 3
    return [
        (
            aggregated >= need,
            f"STRATEGY=bulyan needs {per_step} >= 4*KRUM_MALICIOUS_CLIENTS+3 = {need}, but {per_step}={aggregated}",
            f"raise {_raise_it(s)} or lower KRUM_MALICIOUS_CLIENTS",
        )
    ]


def _trimmed_mean_rules(s: Settings) -> list[Rule]:
    aggregated, per_step = s.updates_per_aggregation
    return [
        (
            int(s.trim_fraction * aggregated) >= 1,
            f"STRATEGY=fedtrimmedavg trims nothing: int(TRIM_FRACTION*{per_step}) = "
            f"int({s.trim_fraction:g}*{aggregated}) = 0, it must be at least 1",
            f"raise TRIM_FRACTION or {per_step}",
        )
    ]


def _median_weakness(s: Settings) -> str | None:
    """The median of two updates is their mean."""
    aggregated, per_step = s.updates_per_aggregation
    if aggregated < 3:
        return (
            f"STRATEGY=fedmedian with {per_step}={aggregated}: the median of fewer than 3 "
            f"updates is their mean, no defence against a bad client; raise {per_step} to 3 or more"
        )
    return None


# Server-optimizer defaults (`tuned`): Flower's legacy ones (eta=0.1, tau=1e-9 for FedAdam and
# FedAdagrad) make FedAdam's steps sign-like and FedAdagrad oscillate. tau=1e-3 as in Reddi et
# al. 2021 and Flower's newer strategies; eta chosen by `python -m bench.server_opt_sweep`
# (digits, Dirichlet 0.5, 3 clients, 5 rounds, seeds 1 and 2, final accuracy on validation
# splits; docs/operations.md "Server-optimizer defaults" has the table).
STRATEGIES: dict[str, StrategyKind] = {
    "fedavg": StrategyKind("FedAvg"),
    "fedprox": StrategyKind("FedProx", lambda s: {"proximal_mu": s.proximal_mu}),
    "fedadam": StrategyKind("FedAdam", _fedopt(moments=True), {"eta": 0.1, "tau": 1e-3}, own_server_step=True),
    "fedyogi": StrategyKind("FedYogi", _fedopt(moments=True), {"eta": 0.03, "tau": 1e-3}, own_server_step=True),
    "fedadagrad": StrategyKind("FedAdagrad", _fedopt(moments=False), {"eta": 0.03, "tau": 1e-3}, own_server_step=True),
    "fedavgm": StrategyKind(
        "FedAvgM",
        lambda s: {"server_momentum": s.server_momentum, "server_learning_rate": s.server_learning_rate},
        own_server_step=True,
    ),
    "fedmedian": StrategyKind("FedMedian", robust=True, weakness=_median_weakness),
    "fedtrimmedavg": StrategyKind(
        "FedTrimmedAvg", lambda s: {"beta": s.trim_fraction}, robust=True, rules=_trimmed_mean_rules
    ),
    "krum": StrategyKind(
        "Krum",
        lambda s: {"num_malicious_clients": s.krum_malicious_clients, "num_clients_to_keep": s.krum_clients_to_keep},
        robust=True,
        rules=_krum_rules,
    ),
    # Krum picks theta = n - 2f updates one by one, then a coordinate-wise trimmed mean of the
    # beta = theta - 2f closest to the median; KRUM_MALICIOUS_CLIENTS is its f.
    "bulyan": StrategyKind(
        "Bulyan",
        lambda s: {"num_malicious_clients": s.krum_malicious_clients, "to_keep": 0},
        robust=True,
        rules=_bulyan_rules,
    ),
}
