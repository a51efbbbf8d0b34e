"""A client's private training (DP=record): checked at its start, planned before each fit
against the budget, and put on the shard's ledger before the update leaves."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from client import wiring
from client.data.shards import Shard
from client.privacy import dpsgd
from client.privacy.ledger import ACCOUNTANT, Ledger, Spend, accountant_version, epsilon
from client.tasks import Task, builtin_module
from shared import protocol
from shared.errors import BadInput
from shared.protocol import MAX_TEXT
from shared.settings import Settings, largest_delta

log = logging.getLogger("flowerpot.client")


@dataclass(frozen=True)
class Planned:
    """One fit's private training: its mechanism, the ledger after it, and that ledger's epsilon."""

    mechanism: dpsgd.Mechanism
    spends: list[Spend]
    epsilon: float
    loop: Callable[[Any, Any, Any], Any]


class PrivateTraining:
    def __init__(self, shard: Shard, settings: Settings, ledger: Ledger) -> None:
        self.shard, self.settings, self.ledger = shard, settings, ledger
        self.declined = False  # said once in the log, then only in each declined fit's answer

    @classmethod
    def start(cls, shard: Shard, settings: Settings, task: Task, model: nn.Module) -> PrivateTraining:
        """BadInput when this shard and task cannot train privately: a task with its own train
        (its loop cannot be made private from outside), a layer DP-SGD cannot train, a delta too
        large for the shard, an unreadable ledger."""
        if task.train is not None and task.train is not builtin_module().train:  # the built-in loop is ours
            raise BadInput(
                f"DP=record: TASK={task.name} brings its own train, whose loop cannot be made private from "
                "outside: remove train from the task (Flowerpot's DP-SGD then trains its model), or set DP=off"
            )
        dpsgd.check_private(model, task.name)
        examples = len(shard.y_train)
        most = largest_delta(examples)
        if settings.dp_delta > most:
            raise BadInput(
                f"DP_DELTA={settings.dp_delta:g} is not well below 1/{examples} for the {examples} training "
                f"examples of {shard.name}: set DP_DELTA at most {most:.1e}"
            )
        ledger = Ledger(settings.dp_ledger_dir or settings.data_dir / "privacy", shard.name, shard.data_checksum)
        ledger.check_writable()
        spent = epsilon(ledger.spends, settings.dp_delta)
        log.info(
            "DP=record: %s trains with DP-SGD (noise multiplier %g, clip norm %g); its ledger %s: epsilon %.3f at "
            "delta %g so far, over %d steps%s",
            shard.name,
            settings.dp_noise_multiplier,
            settings.dp_clip_norm,
            ledger.path,
            spent,
            settings.dp_delta,
            ledger.steps,
            "" if settings.dp_epsilon_budget is None else f", budget {settings.dp_epsilon_budget:g}",
        )
        return cls(shard, settings, ledger)

    def plan(self, config: Any, what: str) -> Planned:
        """The fit's private training, or AnswerFailed when it would pass DP_EPSILON_BUDGET: the
        client declines the fit (it still evaluates)."""
        s = self.settings
        mechanism = dpsgd.mechanism(
            len(self.shard.y_train), config.epochs, config.batch_size, s.dp_noise_multiplier, s.dp_clip_norm
        )
        spends = self.ledger.with_steps(mechanism.noise_multiplier, mechanism.sample_rate, mechanism.steps)
        after = epsilon(spends, s.dp_delta)
        if s.dp_epsilon_budget is not None and after > s.dp_epsilon_budget:
            now = epsilon(self.ledger.spends, s.dp_delta)
            reason = (
                f"declined: {self.shard.name} has spent epsilon {now:.3f} at delta {s.dp_delta:g}, and this fit "
                f"would bring it to {after:.3f}, above DP_EPSILON_BUDGET={s.dp_epsilon_budget:g}"
            )
            if not self.declined:
                log.warning("%s: %s; it declines every further fit and still evaluates", what, reason)
                self.declined = True
            raise wiring.AnswerFailed(reason)
        loop = functools.partial(
            dpsgd.train, noise_multiplier=mechanism.noise_multiplier, clip_norm=mechanism.clip_norm
        )
        return Planned(mechanism, spends, after, loop)

    def spent(self, planned: Planned, what: str) -> dict[str, Any]:
        """Put the fit on the ledger (before its update is sent); the privacy metrics it reports."""
        self.ledger.record(planned.spends)
        s = self.settings
        log.info(
            "%s: privacy spent by %s: epsilon %.3f at delta %g (%d DP-SGD steps in all, %d in this fit)",
            what,
            self.shard.name,
            planned.epsilon,
            s.dp_delta,
            self.ledger.steps,
            planned.mechanism.steps,
        )
        metrics: dict[str, Any] = {
            protocol.PRIVACY_EPSILON: planned.epsilon,
            protocol.PRIVACY_DELTA: s.dp_delta,
            protocol.PRIVACY_NOISE_MULTIPLIER: planned.mechanism.noise_multiplier,
            protocol.PRIVACY_CLIP_NORM: planned.mechanism.clip_norm,
            protocol.PRIVACY_SAMPLE_RATE: planned.mechanism.sample_rate,
            protocol.PRIVACY_STEPS: self.ledger.steps,
            protocol.PRIVACY_ACCOUNTANT: f"{ACCOUNTANT} ({accountant_version()})",
        }
        ledger = ledger_text(self.ledger.spends)
        if len(ledger) <= MAX_TEXT:
            metrics[protocol.PRIVACY_LEDGER] = ledger
        return metrics


def ledger_text(spends: list[Spend]) -> str:
    """The ledger as compact JSON: [[noise multiplier, sample rate, steps], ...]."""
    return json.dumps([s.to_json() for s in spends], separators=(",", ":"))
