"""What one client's answer may claim: example counts, metrics, and how far an update moves the model.

An authenticated client can still lie. These checks bound what a lie can do, cheaply enough for
every round (vectorized numpy over arrays the server holds anyway):

- Example counts (fit and evaluate) weigh a client in every average. A count above the size of
  the whole configured data set (or MAX_CLIENT_EXAMPLES) cannot be true: the answer is refused.
  A count above MEDIAN_MULTIPLE x the round's median report (with at least 3 reports) may be an
  honest but skewed shard: it is clipped to that bound, and so is a participant's total over its
  connections against the median participant's (one certificate's many connections weigh as one):
  a client claiming the most the bounds allow weighs at most twice an honest client of median size.
- Metrics: known keys with their types only (others dropped, one warning per client), strings
  capped, numbers finite, accuracies within [0, 1]; so results and history stay small and true.
- Update norm (checked by the guard, sync and async alike): the L2 distance between an update
  and the current global model, refused (not clipped: clipping would still let a bad client push
  the model by the whole bound every round, at full weight) above two bounds that follow the
  model and the round:
  - an absolute one: UPDATE_NORM_LIMIT when the operator sets it, else NORM_MODEL_MULTIPLE x the
    global model's own L2 norm (at least NORM_FLOOR_RMS per weight, for a model near zero). An
    update that moves a model by several times its whole size does not train it, it replaces it;
  - a relative one, with at least MEDIAN_MIN_REPORTS sound updates in a round (or async buffer):
    UPDATE_NORM_MEDIAN_MULTIPLE x their median norm. A minority cannot move the median, so one
    client's update can never be many times larger than the typical honest one.
  Measured (digits CNN, 53,002 weights, norm 8.9 at the start; 4 IID shards, 3 local epochs,
  learning rate 0.05): honest updates 4.0-4.4 in round 1 (0.5x the model's norm), 0.7-2.3 later;
  the largest honest one of a round at most 1.3x the round's median (also with Dirichlet 0.5
  shards). A label-flipping client's own update was 1.5-2.5x the median.
"""

from __future__ import annotations

import logging
import math
from numbers import Real
from typing import Any

import numpy as np

from shared.datasets import SIZES
from shared.errors import BadInput
from shared.protocol import (
    EVALUATE_METRICS,
    FIT_METRICS,
    MAX_NAME,
    MAX_TEXT,
    NAME,
    NOT_FINITE,
    NUMBER,
    RATIO,
    TEXT,
    clean_text,
)
from shared.settings import Settings

log = logging.getLogger("flowerpot.server")

# A count above this many times the round's median report is clipped. 2: the largest honest IID
# shard is about 1.0x the median and a Dirichlet 0.5 one rarely above 2x, while at 10 one liar of
# three digits clients kept 65% of FedAvg's weight.
MEDIAN_MULTIPLE = 2
MEDIAN_MIN_REPORTS = 3  # below this, a median says nothing about who is lying
# The automatic absolute update bound: this many times the global model's L2 norm, the norm taken
# as at least NORM_FLOOR_RMS x sqrt(weights) (a model initialised near zero has no size of its
# own yet). 5: ten times the largest honest ratio measured (0.5, in round 1), room for data sets
# with many more local steps per round; the 950 of a boosted attack is about 100x the digits model.
NORM_MODEL_MULTIPLE = 5.0
NORM_FLOOR_RMS = 0.01
# A global model whose evaluation loss is above this many times the lowest one of the run so far
# is unusable (rolled back): honest rounds change the loss by a few times at most, a model
# replaced by a boosted update multiplies it by thousands or makes it NaN.
LOSS_EXPLOSION = 100.0


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
    if settings.dataset == "synthetic":
        return settings.synthetic_examples
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


def share_bounds(counts: dict[str, list[int]]) -> dict[str, list[int]]:
    """Each participant's counts (its connections', in order) with no connection above
    MEDIAN_MULTIPLE x the median connection and no participant's total above MEDIAN_MULTIPLE x the
    median participant's total (scaled down in proportion); each bound needs MEDIAN_MIN_REPORTS."""
    bound = median_bound([n for ns in counts.values() for n in ns])
    clipped = {p: [min(n, bound) if bound is not None else n for n in ns] for p, ns in counts.items()}
    total_bound = median_bound([sum(ns) for ns in clipped.values()])
    if total_bound is None:
        return clipped
    for p, ns in clipped.items():
        total = sum(ns)
        if total > total_bound:
            clipped[p] = [max(1, n * total_bound // total) for n in ns]
    return clipped


def clean_metrics(metrics: dict[str, Any], known: dict[str, str]) -> tuple[dict[str, Any], list[str], str | None]:
    """(the metrics kept, the keys dropped, a problem that refuses the answer or None); `known`
    is shared/protocol.py's FIT_METRICS or EVALUATE_METRICS.
    Texts are cut to MAX_TEXT characters (names to MAX_NAME) and their control characters
    replaced; a known number that is not finite, or a ratio outside [0, 1], is a problem."""
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in metrics.items():
        kind = known.get(key)
        if kind in (TEXT, NAME) and isinstance(value, str):
            kept[key] = clean_text(value, MAX_TEXT if kind == TEXT else MAX_NAME)
        elif kind in (NUMBER, RATIO) and isinstance(value, Real) and not isinstance(value, bool):
            number = float(value)
            if not math.isfinite(number):
                return kept, dropped, f"its metric {key} is {number}"
            if kind == RATIO and not 0.0 <= number <= 1.0:
                return kept, dropped, f"its metric {key} is {number}, outside [0, 1]"
            kept[key] = value
        else:
            dropped.append(clean_text(key))
    return kept, dropped, None


def loss_problem(loss: Any) -> str | None:
    if not isinstance(loss, Real) or isinstance(loss, bool):
        return f"its loss is {loss!r}"
    if not math.isfinite(float(loss)):
        return f"its loss is {float(loss)}, {NOT_FINITE}"
    return None


def model_norm_limit(model_norm: float, size: int) -> float:
    """The automatic absolute bound of an update's norm for a global model of this norm and size."""
    return NORM_MODEL_MULTIPLE * max(model_norm, NORM_FLOOR_RMS * math.sqrt(size))


def median_norm_bound(norms: list[float], multiple: float) -> float | None:
    """`multiple` x the median of a round's update norms; None when off (0) or too few to say."""
    if multiple <= 0 or len(norms) < MEDIAN_MIN_REPORTS:
        return None
    return multiple * float(np.median(norms))


class UpdateDistance:
    """The L2 distance of updates from the current global model, all arrays together."""

    def __init__(self) -> None:
        self.flat: np.ndarray | None = None
        self.model_norm = 0.0  # of the global model itself

    def set_global(self, arrays: list[np.ndarray]) -> None:
        self.flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
        self.model_norm = l2_norm(self.flat)

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
