"""The privacy ledger of one shard: every DP-SGD step ever released from its records.

Privacy spent is a property of the data, not of a run: a shard trained in three runs, or by a
client restarted twice, has spent what all of them released. The ledger is one JSON file per
shard (DP_LEDGER_DIR, default DATA_DIR/privacy), named by the shard and its data checksum, so
that re-prepared shards with other data start a ledger of their own and the same data prepared
again keeps its own. Only the client holding the shard's claim writes it, so no two writers race.

The accountant composes the whole ledger: Opacus' RDP accountant, from its history of
(noise multiplier, sample rate, steps); the file holds exactly that history, so that anyone can
recompute epsilon with another accountant.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from shared.errors import BadInput
from shared.modelfile import write_json

log = logging.getLogger("flowerpot.client")

FORMAT = 1  # the ledger file's layout; another number is refused, never misread
ACCOUNTANT = "opacus.accountants.RDPAccountant"


@dataclass(frozen=True)
class Spend:
    """Steps of one (noise multiplier, sample rate): the subsampled Gaussian mechanism, composed."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def to_json(self) -> list[float | int]:
        return [self.noise_multiplier, self.sample_rate, self.steps]


def accountant_version() -> str:
    return f"opacus {version('opacus')}"


def epsilon(spends: list[Spend], delta: float) -> float:
    """The ledger's epsilon at `delta` by Opacus' RDP accountant (0 for no steps)."""
    history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in spends if s.steps > 0]
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = history
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a large epsilon, said as a number
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


class Ledger:
    """One shard's ledger file: read at the client's start, written after every private fit
    before its update leaves the client (an update the ledger does not hold is never sent)."""

    def __init__(self, folder: Path, shard: str, checksum: str) -> None:
        self.path = folder / f"{shard}-{checksum[:16]}.json"
        self.shard = shard
        self.spends = self._read()

    def _read(self) -> list[Spend]:
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                found = data.get("format") if isinstance(data, dict) else type(data).__name__
                raise BadInput(
                    f"DP_LEDGER_DIR: {self.path} is a privacy ledger of format {found!r}, not {FORMAT}: "
                    "use the Flowerpot version that wrote it, or move it aside knowing that its spend is then forgotten"
                )
            spends = [Spend(float(s), float(q), int(n)) for s, q, n in data["spends"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadInput(
                f"DP_LEDGER_DIR: the privacy ledger {self.path} cannot be read ({exc.__class__.__name__}: {exc}): "
                "restore it from a backup; deleting it forgets the privacy this shard has spent"
            ) from None
        if any(s.noise_multiplier <= 0 or not 0 < s.sample_rate <= 1 or s.steps < 0 for s in spends):
            raise BadInput(f"DP_LEDGER_DIR: the privacy ledger {self.path} holds impossible entries: restore it")
        return spends

    def check_writable(self) -> None:
        """BadInput at the client's start when the ledger's folder cannot be written: found then,
        not at the first fit, whose update would wait for it."""
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".{self.path.name}.probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise BadInput(
                f"DP_LEDGER_DIR={folder} cannot be written ({exc.strerror}): make it a writable folder for the "
                "client, or leave DP_LEDGER_DIR empty (DATA_DIR/privacy)"
            ) from None

    def with_steps(self, noise_multiplier: float, sample_rate: float, steps: int) -> list[Spend]:
        """The ledger as it would be after `steps` more of (noise multiplier, sample rate)."""
        spends = list(self.spends)
        if spends and (spends[-1].noise_multiplier, spends[-1].sample_rate) == (noise_multiplier, sample_rate):
            last = spends.pop()
            spends.append(Spend(noise_multiplier, sample_rate, last.steps + steps))
        else:
            spends.append(Spend(noise_multiplier, sample_rate, steps))
        return spends

    def record(self, spends: list[Spend]) -> None:
        """Make `spends` the ledger, on disk first: BadInput when it cannot be written."""
        data: dict[str, Any] = {
            "format": FORMAT,
            "shard": self.shard,
            "accountant": ACCOUNTANT,
            "spends": [s.to_json() for s in spends],  # (noise multiplier, sample rate, steps)
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, data)
        except OSError as exc:
            raise BadInput(
                f"DP_LEDGER_DIR={self.path.parent} cannot be written ({exc.strerror}): make it writable for the "
                "client; a private update is never sent before its privacy is on the ledger"
            ) from None
        self.spends = spends

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.spends)


def steps_per_epoch(examples: int, batch_size: int) -> int:
    """Poisson-sampled batches per epoch: as many as fixed batches would be, so an epoch sees
    every example once in expectation (at sample rate batch_size / examples)."""
    return max(1, math.ceil(examples / batch_size))
