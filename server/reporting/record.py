"""What one round leaves in the history: the one definition of a round record.

The server builds a `RoundRecord` per round; `Results` writes it (history.jsonl, history.json,
history.csv) and reads it back on resume, always through `to_json` / `from_json`, so the JSON
keys are spelled once. They are the keys earlier versions wrote into history.json: the benchmark,
the tests and users' scripts read them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Literal

Phase = Literal["fit", "evaluate"]


@dataclass(frozen=True)
class ClientEntry:
    """What one client reported in one phase of a round."""

    client: str  # the name it joined with (or a short id)
    phase: Phase
    num_examples: int
    metrics: dict[str, Any]  # as the client sent them; in "evaluate" also its "loss"
    # Its site (SITE_NAME) and shard, as it said when it joined; a plain Flower client's site is
    # its name and its shard empty. Histories written before sites existed lack both.
    site: str = ""
    shard: str = ""

    def to_json(self) -> dict[str, Any]:
        """Without an empty site and shard: a client entry of an older history reads back as it was."""
        return {k: v for k, v in vars(self).items() if v != "" or k not in ("site", "shard")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClientEntry:
        if data.get("phase") not in ("fit", "evaluate"):
            raise ValueError(f"a client entry has phase {data.get('phase')!r}, not 'fit' or 'evaluate'")
        return cls(
            str(data["client"]),
            data["phase"],
            int(data["num_examples"]),
            dict(data["metrics"]),
            str(data.get("site", "")),
            str(data.get("shard", "")),
        )


def _when_present() -> Any:
    """A field only some records have (None in the others): a column of history.csv when any
    of the run's records has it (async runs' staleness, sync rounds' late answers)."""
    return field(default=None, metadata={"when_present": True})


# A field that is also a column of history.csv: `field(metadata=CSV)`, spelled out so that type
# checkers see which fields have a default and which have none.
CSV = {"csv": True}


@dataclass(frozen=True)
class RoundRecord:
    """One finished round: counts, losses, accuracies, time, traffic, and every client's report."""

    round: int = field(metadata=CSV)
    clients_trained: int = field(metadata=CSV)  # updates aggregated (refused ones not counted)
    clients_failed: int = field(metadata=CSV)  # fit calls that failed (crash, timeout)
    updates_refused: int = field(metadata=CSV)  # updates the guard refused (NaN/Inf, wrong shapes, ...)
    clients_evaluated: int = field(metadata=CSV)
    eval_failures: int
    train_loss: float | None = field(metadata=CSV)
    train_accuracy: float | None = field(metadata=CSV)
    eval_loss: float | None = field(metadata=CSV)
    eval_accuracy: float | None = field(metadata=CSV)
    seconds: float = field(metadata=CSV)  # the round's wall time: fit and evaluate
    fit_seconds: float
    started_at: float  # Unix time the round started
    bytes_sent: int = field(metadata=CSV)  # serialized Flower messages, both ways, during the round
    bytes_received: int = field(metadata=CSV)
    model_bytes: int  # the global model's size (.npy bytes of every array)
    fit_metrics: dict[str, Any]  # aggregated over the clients that trained
    eval_metrics: dict[str, Any]  # aggregated over the clients that evaluated
    clients: list[ClientEntry]
    # Why the round's result was not applied (MIN_COMPLETION_RATE, no sound update), or None.
    # Added after the first histories were written: those lack the key and read as None.
    failed: str | None = field(default=None, metadata=CSV)
    # Async mode: a record is one model version. The staleness of the updates it
    # aggregated (versions between the one a client trained on and the one it was applied to),
    # how many updates were dropped as staler than MAX_STALENESS, and which version the
    # evaluation in this record measured (evaluations finish while training goes on). Sync
    # records, and histories written before, lack these keys and read as None.
    staleness_mean: float | None = _when_present()
    staleness_max: int | None = _when_present()
    updates_stale: int | None = _when_present()
    eval_version: int | None = _when_present()
    # Sync over-selection (FIT_QUORUM, ROUND_DEADLINE): fits the round did not wait for, whose
    # answers were dropped. Rounds without any, and histories written before, lack the key.
    updates_late: int | None = _when_present()
    # Clients connected when the round began (async: when the version was made): with
    # FRACTION_FIT below 1, how many the trained ones were sampled from. Histories written
    # before lack it and read as None.
    clients_connected: int | None = field(default=None, metadata=CSV)

    def to_json(self) -> dict[str, Any]:
        # Shallow, not dataclasses.asdict: no deep copy of every metric, every round.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["clients"] = [c.to_json() for c in self.clients]
        for key in OPTIONAL:  # a sync round that was applied is written exactly as earlier versions wrote it
            if data[key] is None:
                del data[key]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        """ValueError (naming the key) when `data` is not a round record of this layout."""
        if not isinstance(data, dict):
            raise ValueError(f"a round record is a JSON object, not {type(data).__name__}")
        missing = [f.name for f in fields(cls) if f.name not in data and f.name not in OPTIONAL]
        if missing:
            raise ValueError(f"a round record lacks {', '.join(missing)}")
        try:
            values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
            values["clients"] = [ClientEntry.from_json(c) for c in data["clients"]]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"a round record has a malformed client entry ({exc.__class__.__name__}: {exc})") from None
        return cls(**values)

    def to_line(self) -> str:
        """One line of history.jsonl (no newline inside: JSON escapes them)."""
        return json.dumps(self.to_json(), default=str)

    @classmethod
    def from_line(cls, line: str) -> RoundRecord:
        return cls.from_json(json.loads(line))


OPTIONAL = frozenset(f.name for f in fields(RoundRecord) if f.default is None)  # keys added later, default None
CSV_COLUMNS = tuple(f.name for f in fields(RoundRecord) if f.metadata.get("csv"))
WHEN_PRESENT_COLUMNS = tuple(f.name for f in fields(RoundRecord) if f.metadata.get("when_present"))
