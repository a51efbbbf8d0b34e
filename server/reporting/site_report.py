"""The per-site view of a run: which site and shard each client trained, and how well the final
model does on each client's own test data. A federation is judged by its weakest site too, not
only by the weighted mean, which a few large sites dominate."""

from __future__ import annotations

from numbers import Real
from pathlib import Path
from typing import Any

from flwr.server.client_proxy import ClientProxy

from server.reporting.record import ClientEntry, RoundRecord
from server.training.strategies import client_label
from shared import protocol
from shared.modelfile import write_json

SITES_JSON = "sites.json"  # the final round's per-client accuracies, beside history.json
MAX_LISTED = 20  # clients named in one round's log line; the rest are counted


def where(proxy: ClientProxy, result: Any) -> tuple[str, str]:
    """(site, shard) of a client: what it said when it joined (server/transport/sites.py), else its name
    and the shard it reported in its metrics (a plain Flower client reports none)."""
    metrics = getattr(result, "metrics", None) or {}
    site = getattr(proxy, "site", "") or client_label(proxy)
    shard = getattr(proxy, "shard", "") or str(metrics.get(protocol.SHARD, ""))
    return site, shard


def client_entries(
    fit_results: list[tuple[ClientProxy, Any]], eval_results: list[tuple[ClientProxy, Any]]
) -> list[ClientEntry]:
    """What each client reported in a round (or an async version): its fit, then its evaluation
    (with its loss among the metrics), each with its site and shard."""
    return [
        *(ClientEntry(client_label(p), "fit", r.num_examples, r.metrics, *where(p, r)) for p, r in fit_results),
        *(
            ClientEntry(client_label(p), "evaluate", r.num_examples, {"loss": r.loss, **r.metrics}, *where(p, r))
            for p, r in eval_results
        ),
    ]


def step(record: RoundRecord) -> str:
    """What the record is of: a sync round, or an async model version (which has a staleness)."""
    return "round" if record.staleness_mean is None else "version"


def _label(entry: Any) -> str:
    return f"{entry.site or entry.client}/{entry.shard or '?'}"


def clients_line(record: RoundRecord) -> str:
    """One log line naming every client of the round by site and shard, with its accuracy (or
    its training loss when nobody evaluated)."""
    evaluated = [c for c in record.clients if c.phase == "evaluate"]
    if evaluated:
        parts = [f"{_label(c)} {fmt(c.metrics.get(protocol.ACCURACY))}" for c in evaluated]
        what = "accuracy"
    else:
        fits = [c for c in record.clients if c.phase == "fit"]
        parts = [f"{_label(c)} {fmt(c.metrics.get(protocol.TRAIN_LOSS))}" for c in fits]
        what = "train loss"
    return f"{step(record)} {record.round} {what} by site/shard: {named_list(parts) or 'no client'}"


def named_list(parts: list[str], limit: int = MAX_LISTED) -> str:
    """The first `limit` of `parts`, comma-separated, and how many more: a log line that names
    clients stays readable with a thousand of them."""
    more = f", and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def site_summary(record: RoundRecord, spent: dict[tuple[str, str], float] | None = None) -> dict[str, Any]:
    """Per-client accuracy of a round (worst, best, spread) and the weighted mean; with `spent`
    (DP=record: each (site, shard)'s epsilon after its last private fit), each one's epsilon."""
    clients: list[dict[str, Any]] = [
        {"site": c.site or c.client, "shard": c.shard, "client": c.client, "examples": c.num_examples,
         "accuracy": float(c.metrics[protocol.ACCURACY]), **task_metrics(c.metrics)}
        for c in record.clients
        if c.phase == "evaluate" and isinstance(c.metrics.get(protocol.ACCURACY), int | float)
    ]  # fmt: skip
    for client in clients:
        if spent and (epsilon := spent.get((client["site"], client["shard"]))) is not None:
            client[protocol.PRIVACY_EPSILON] = epsilon
    summary: dict[str, Any] = {"round": record.round, "weighted_accuracy": record.eval_accuracy, "clients": clients}
    if clients:
        worst = min(clients, key=lambda c: c["accuracy"])
        best = max(clients, key=lambda c: c["accuracy"])
        summary.update(worst=worst, best=best, spread=best["accuracy"] - worst["accuracy"])
    return summary


# What every Flowerpot evaluation reports; anything else the guard kept is the task's (METRICS).
OWN_EVALUATE_KEYS = frozenset({"accuracy", "loss", "eval_seconds", "shard"})


def task_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """{"metrics": the task's own metrics of an evaluation} when it has any, else {}: a run of
    the built-in task writes sites.json as before."""
    extra = {k: v for k, v in metrics.items() if k not in OWN_EVALUATE_KEYS}
    return {"metrics": extra} if extra else {}


def report_sites(final: RoundRecord, folder: Path, spent: dict[tuple[str, str], float] | None = None) -> list[str]:
    """Write SITES_JSON for the final round; the log lines that report it."""
    summary = site_summary(final, spent)
    write_json(folder / SITES_JSON, summary)
    if "worst" not in summary:
        return [f"no client reported an accuracy of the final {step(final)}: no per-site report"]
    worst, best = summary["worst"], summary["best"]
    return [
        f"per-client accuracy, {step(final)} {final.round}: "
        f"worst {worst['accuracy']:.4f} ({worst['site']}/{worst['shard']}), "
        f"best {best['accuracy']:.4f} ({best['site']}/{best['shard']}), spread {summary['spread']:.4f}, "
        f"weighted mean {fmt(final.eval_accuracy)} over {len(summary['clients'])} clients; in {folder / SITES_JSON}"
    ]


def fmt(value: Any) -> str:
    """A loss or an accuracy in a log line: four decimals, or n/a when there is no number."""
    return f"{value:.4f}" if isinstance(value, Real) and not isinstance(value, bool) else "n/a"
