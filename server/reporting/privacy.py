"""The privacy report of a run (RESULTS_DIR/privacy.json). DP=record: what each site's privacy
ledger held after its last private fit, as the site reported it (the sites train privately and
account; the server never sees a record, so it reports). DP=client: the run's own spend, which
the server accounts for, the rounds being its mechanism's steps.

Per site and shard: epsilon at delta, the mechanism of its last fit (noise multiplier, clip
norm, Poisson sample rate), the ledger's optimizer steps and the ledger itself, a list of
[noise multiplier, sample rate, steps], from which anyone can recompute epsilon with another
accountant (docs/privacy.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from server.reporting.record import RoundRecord
from server.training.client_privacy import ClientLevel, accountant_name
from shared import protocol
from shared.modelfile import write_json

PRIVACY_JSON = "privacy.json"
FORMAT = 1


def site_ledgers(history: list[RoundRecord]) -> list[dict[str, Any]]:
    """Each (site, shard)'s last private fit in the run, in the order they first trained."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for record in history:
        for entry in record.clients:
            metrics = entry.metrics
            if entry.phase != "fit" or not isinstance(metrics.get(protocol.PRIVACY_EPSILON), int | float):
                continue
            row: dict[str, Any] = {
                "site": entry.site or entry.client,
                "shard": entry.shard,
                "round": record.round,
                "epsilon": float(metrics[protocol.PRIVACY_EPSILON]),
                "delta": metrics.get(protocol.PRIVACY_DELTA),
                "noise_multiplier": metrics.get(protocol.PRIVACY_NOISE_MULTIPLIER),
                "clip_norm": metrics.get(protocol.PRIVACY_CLIP_NORM),
                "sample_rate": metrics.get(protocol.PRIVACY_SAMPLE_RATE),
                "steps": metrics.get(protocol.PRIVACY_STEPS),
                "accountant": metrics.get(protocol.PRIVACY_ACCOUNTANT),
                "ledger": _ledger(metrics.get(protocol.PRIVACY_LEDGER)),
            }
            latest[(row["site"], row["shard"])] = row
    return list(latest.values())


def _ledger(text: Any) -> list[list[float]] | None:
    """The ledger a site sent (None: it was too long to send, or is malformed: the site has it)."""
    try:
        spends = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    if not isinstance(spends, list) or not all(isinstance(s, list) and len(s) == 3 for s in spends):
        return None
    return spends


def report_privacy(
    history: list[RoundRecord], folder: Path, mode: str, client_level: ClientLevel | None = None
) -> list[str]:
    """Write PRIVACY_JSON when any site trained privately, or the run did (DP=client); the log
    line that states the spend."""
    if client_level is not None:
        return report_client_level(len(history), folder, client_level)
    sites = site_ledgers(history)
    if not sites:
        return [] if mode == "off" else [f"DP={mode}, but no site reported a private fit: no {PRIVACY_JSON}"]
    worst = max(sites, key=lambda row: row["epsilon"])
    deltas = sorted({row["delta"] for row in sites if row["delta"] is not None})
    accountants = sorted({row["accountant"] for row in sites if row["accountant"]})
    report = {
        "format": FORMAT,
        "mode": "record",
        "accountant": accountants[0] if len(accountants) == 1 else accountants,
        "delta": deltas[0] if len(deltas) == 1 else deltas,
        "epsilon_max": worst["epsilon"],
        "sites": sites,
    }
    write_json(folder / PRIVACY_JSON, report)
    delta = ", ".join(f"{d:g}" for d in deltas) or "?"
    return [
        f"privacy spent (DP=record, per site, {report['accountant'] or 'accountant not reported'}): epsilon at most "
        f"{worst['epsilon']:.3f} at delta {delta} ({worst['site']}/{worst['shard']}, {worst['steps']} DP-SGD steps) "
        f"over {len(sites)} sites' shards; in {folder / PRIVACY_JSON}"
    ]


def report_client_level(rounds: int, folder: Path, dp: ClientLevel) -> list[str]:
    """DP=client: every round played is one step of the subsampled Gaussian mechanism, applied
    or not (a round without updates still publishes noise)."""
    epsilon = dp.epsilon(rounds)
    report = {
        "format": FORMAT,
        "mode": "client",
        "accountant": accountant_name(),
        "delta": dp.delta,
        "epsilon": epsilon,
        "noise_multiplier": dp.noise_multiplier,
        "clip_norm": dp.clip_norm,
        "sample_rate": dp.sample_rate,
        "steps": rounds,
        # amplification by sampling holds because the sample is random and secret
        "sampling": "poisson, from os.urandom",
    }
    write_json(folder / PRIVACY_JSON, report)
    return [
        f"privacy spent (DP=client, per client, {report['accountant']}): epsilon {epsilon:.3f} at delta "
        f"{dp.delta:g} after {rounds} rounds (sample rate {dp.sample_rate:g}, noise multiplier "
        f"{dp.noise_multiplier:g}, clip norm {dp.clip_norm:g}); in {folder / PRIVACY_JSON}"
    ]
