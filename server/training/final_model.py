"""The final model, after the run's report, to the clients its last evaluation left out: a sync
client still busy with a late fit (FIT_QUORUM, ROUND_DEADLINE), an async client still training
after FINAL_EVAL_TIMEOUT. Each client keeps the model it evaluates for `predict`, so it is handed
out as an evaluation whose answer is not counted (the report is written already)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from flwr.common import Code, EvaluateIns, Parameters, Scalar
from flwr.server.client_proxy import ClientProxy

from server.training.strategies import client_label
from shared import protocol

log = logging.getLogger("flowerpot.server")


def hand_out(
    proxies: list[ClientProxy],
    parameters: Parameters,
    config: dict[str, Scalar],
    timeout: float,
    server_round: int,
    label: Callable[[ClientProxy], str] = client_label,
) -> list[ClientProxy]:
    """`parameters` (the model the server kept: the last sound one after a final roll-back) to
    each of `proxies` at once, each within `timeout`; the clients that took it."""
    if not proxies:
        return []
    # No LOCAL_BASELINE: a local-only training would be thrown away.
    ins = EvaluateIns(parameters, {k: v for k, v in config.items() if k != protocol.LOCAL_BASELINE})

    def give(proxy: ClientProxy) -> bool:
        try:
            return proxy.evaluate(ins, timeout, server_round).status.code == Code.OK
        except Exception as exc:  # a client gone by now keeps the model it had
            log.warning("could not give client %s the final model: %s", label(proxy), exc)
            return False

    with ThreadPoolExecutor(max_workers=len(proxies), thread_name_prefix="final-model") as pool:
        given = [p for p, ok in zip(proxies, pool.map(give, proxies)) if ok]
    if given:
        log.info("the final model went also to %s (evaluated, not counted)", ", ".join(sorted(map(label, given))))
    return given
