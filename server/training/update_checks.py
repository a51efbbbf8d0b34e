"""What one client's answer may claim: example counts, metrics, and how far an update moves the model.

An authenticated client can still lie. These checks bound what a lie can do, cheaply enough for
every round (vectorized numpy over arrays the server holds anyway):

- Example counts (fit and evaluate) weigh a client in every average. A count above the size of
  the whole configured data set (or MAX_CLIENT_EXAMPLES) cannot be true: the answer is refused.
  A count above MEDIAN_MULTIPLE x the round's median report (with at least 3 reports) may be an
  honest but skewed shard: it is clipped to that bound, so no single client owns the average.
- Metrics: known keys with their types only (others dropped, one warning per client), strings
  capped, numbers finite, accuracies within [0, 1]; so results and history stay small and true.
- Update norm: the L2 distance between an update and the current global model, refused above
  UPDATE_NORM_LIMIT (see README: refusal, because clipping would still let a bad client push the
  model by the whole limit every round, at full weight).
"""

from __future__ import annotations

import logging
import math
from numbers import Real
from typing import Any

import numpy as np

from shared.datasets import SIZES
from shared.errors import BadInput
from shared.protocol import EVALUATE_METRICS, FIT_METRICS, NUMBER, RATIO, TEXT
from shared.settings import Settings

log = logging.getLogger("flowerpot.server")

MEDIAN_MULTIPLE = 10  # a count above this many times the round's median report is clipped
MEDIAN_MIN_REPORTS = 3  # below this, a median says nothing about who is lying
MAX_TEXT = 256  # characters of a text metric that are kept


def known_metrics(task_metrics: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The fit and evaluate metrics a run keeps: the server's own, and its task's METRICS (declared
    by the clients when they joined, checked there) as train_NAME in fits and NAME in evaluations."""
    return (
        {**{f"train_{k}": v for k, v in task_metrics.items()}, **FIT_METRICS},
        {**task_metrics, **EVALUATE_METRICS},
    )


def example_limit(settings: Settings) -> int:
    """The most examples one client can truthfully claim. BadInput when the server cannot know it
    (DATASET=folder without MAX_EXAMPLES or MAX_CLIENT_EXAMPLES)."""
    if settings.max_client_examples:
        return settings.max_client_examples
    if settings.max_examples:
        return settings.max_examples
    if settings.dataset in SIZES:
        return SIZES[settings.dataset]
    raise BadInput(
        f"DATASET={settings.dataset} has no size the server knows, so it cannot bound the example counts "
        "clients claim: set MAX_CLIENT_EXAMPLES to the largest shard a client may have (or MAX_EXAMPLES) "
        "(in .env or the environment)"
    )


def count_problem(num_examples: Any, limit: int, phase: str) -> str | None:
    """Why a claimed example count is unusable, or None."""
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples <= 0:
        return f"it claims {num_examples} {phase} examples"
    if num_examples > limit:
        return f"it claims {num_examples} {phase} examples, more than the {limit} the data set can give"
    return None


def median_bound(counts: list[int]) -> int | None:
    """The clipping bound of a round's counts: MEDIAN_MULTIPLE x their median, with enough reports."""
    if len(counts) < MEDIAN_MIN_REPORTS:
        return None
    return max(1, int(MEDIAN_MULTIPLE * float(np.median(counts))))


def clean_metrics(metrics: dict[str, Any], known: dict[str, str]) -> tuple[dict[str, Any], list[str], str | None]:
    """(the metrics kept, the keys dropped, a problem that refuses the answer or None); `known`
    is shared/protocol.py's FIT_METRICS or EVALUATE_METRICS.
    Texts are cut to MAX_TEXT characters; a known number that is not finite, or a ratio outside
    [0, 1], is a problem."""
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in metrics.items():
        kind = known.get(key)
        if kind == TEXT and isinstance(value, str):
            kept[key] = value[:MAX_TEXT]
        elif kind in (NUMBER, RATIO) and isinstance(value, Real) and not isinstance(value, bool):
            number = float(value)
            if not math.isfinite(number):
                return kept, dropped, f"its metric {key} is {number}"
            if kind == RATIO and not 0.0 <= number <= 1.0:
                return kept, dropped, f"its metric {key} is {number}, outside [0, 1]"
            kept[key] = value
        else:
            dropped.append(str(key)[:MAX_TEXT])
    return kept, dropped, None


def loss_problem(loss: Any) -> str | None:
    if not isinstance(loss, Real) or isinstance(loss, bool) or not math.isfinite(float(loss)):
        return f"its loss is {loss!r}"
    return None


class UpdateDistance:
    """The L2 distance of updates from the current global model, all arrays together."""

    def __init__(self) -> None:
        self.flat: np.ndarray | None = None

    def set_global(self, arrays: list[np.ndarray]) -> None:
        self.flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])

    def of(self, arrays: list[np.ndarray]) -> float:
        assert self.flat is not None, "set_global first"
        update = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
        return l2_norm(update - self.flat)


def l2_norm(vector: np.ndarray) -> float:
    """sqrt(sum(x**2)) with NumPy's own loops. Not np.linalg.norm: that is BLAS, whose worker
    threads spin on after each call and took the CPU from the clients (measured: every round of
    a trivial federation 7 ms longer on 2 cores)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.sqrt(np.square(vector).sum()))
