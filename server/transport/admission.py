"""Who may join, and how long the server waits for enough clients.

Admission is first come, first served up to MAX_CLIENTS connected clients, optionally limited to
an allow-list of client names. The gRPC servicer asks `Admission` before a client is registered;
the client manager never waits without a bound.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion

from server.training.sampling import poisson_sample, seeded_sample
from shared.errors import ClientsTimeout

log = logging.getLogger("flowerpot.server")


class Admission:
    """Counts connected clients against the capacity and checks names against the allow-list."""

    def __init__(self, capacity: int, allowed: frozenset[str] = frozenset(), per_name: int = 0) -> None:
        self.capacity, self.allowed = capacity, allowed
        self._connected = 0
        self._lock = threading.Lock()
        # MAX_CONNECTIONS_PER_CLIENT: replicas of one site may share a certificate, within a bound
        self.per_name = per_name
        self._by_name: dict[str, int] = {}

    def not_allowed(self, name: str) -> str | None:
        """Why `name` may not join at all, or None."""
        if self.allowed and name not in self.allowed:
            return f"client {name!r} is not on the server's allow-list (ALLOWED_CLIENTS)"
        return None

    def take_place(self) -> str | None:
        """Take one of the MAX_CLIENTS places, or say why not. A taken place must be released."""
        with self._lock:
            if self._connected >= self.capacity:
                return (
                    f"the server is full: MAX_CLIENTS={self.capacity} clients are connected; "
                    "stop a client, or raise MAX_CLIENTS on the server"
                )
            self._connected += 1
        return None

    def release(self) -> None:
        with self._lock:
            self._connected -= 1

    def take_name(self, name: str) -> str | None:
        """Count one more connection under `name`, or say why not (MAX_CONNECTIONS_PER_CLIENT).
        A taken name must be released."""
        with self._lock:
            held = self._by_name.get(name, 0)
            if self.per_name and held >= self.per_name:
                return (
                    f"client {name!r} already holds MAX_CONNECTIONS_PER_CLIENT={self.per_name} connection(s): "
                    "stop one of its replicas, or raise MAX_CONNECTIONS_PER_CLIENT on the server"
                )
            self._by_name[name] = held + 1
        return None

    def release_name(self, name: str) -> None:
        with self._lock:
            held = self._by_name.get(name, 0) - 1
            if held > 0:
                self._by_name[name] = held
            else:
                self._by_name.pop(name, None)

    @property
    def connected(self) -> int:
        with self._lock:
            return self._connected


class BoundedClientManager(SimpleClientManager):
    """Flower's client manager, but every wait ends after `wait_timeout` seconds, and sampling is
    reproducible: seeded from SEED and the round (server/training/sampling.py), which the strategy sets
    with `for_round` before it samples (Flower's strategies do not pass the round)."""

    def __init__(self, wait_timeout: float, seed: int = 0, poisson_rate: float | None = None) -> None:
        super().__init__()
        self.wait_timeout = wait_timeout
        self.seed = seed
        # DP=client: each fit samples every client with this probability from the secure source,
        # since amplification by sampling holds only for a random and secret sample (SEED is
        # shared in .env); the number sampled then varies, and may be 0.
        self.poisson_rate = poisson_rate
        self.round, self.phase = 0, "fit"
        # Clients still working on an instruction a sync round stopped waiting for (FIT_QUORUM,
        # ROUND_DEADLINE): not sampled until they answer, since their stream takes one
        # instruction at a time.
        self.busy: set[str] = set()
        self.busy_wait = wait_timeout  # how long sampling waits for busy clients (server: ROUND_TIMEOUT)

    def register(self, client: ClientProxy) -> bool:
        # Flower changes `clients` outside its lock; sampling and counting iterate it under the
        # lock, and raised "dictionary changed size during iteration" in a join storm.
        with self._cv:
            return super().register(client)

    def unregister(self, client: ClientProxy) -> None:
        with self._cv:
            super().unregister(client)

    def hold(self, cid: str) -> None:
        with self._cv:
            self.busy.add(cid)

    def release(self, cid: str) -> None:
        with self._cv:
            self.busy.discard(cid)
            self._cv.notify_all()

    def hold_until(self, cid: str, answer: Future) -> None:
        """Held from sampling until `answer`, an instruction a round stopped waiting for, arrives
        (dropped) or times out."""
        self.hold(cid)
        answer.add_done_callback(lambda _: self.release(cid))

    def wait_free(self, timeout: float) -> bool:
        """Wait until no client is busy with an instruction a round stopped waiting for."""
        with self._cv:
            return self._cv.wait_for(lambda: not self.busy, timeout=timeout)

    def _free(self) -> dict[str, ClientProxy]:
        """Connected clients not busy (the caller holds the lock)."""
        return {cid: p for cid, p in self.clients.items() if cid not in self.busy}

    def num_available(self) -> int:
        """Connected clients that can take an instruction now."""
        with self._cv:
            return len(self._free())

    def for_round(self, server_round: int, phase: str) -> None:
        self.round, self.phase = server_round, phase

    def wait_for(self, num_clients: int, timeout: float | None = None) -> bool:
        wait = self.wait_timeout if timeout is None else timeout
        return super().wait_for(num_clients, timeout=wait)  # type: ignore[arg-type]  # typed int, any float works

    def sample(
        self,
        num_clients: int,
        min_num_clients: int | None = None,
        criterion: Criterion | None = None,
    ) -> list[ClientProxy]:
        """Wait (bounded) until enough clients are connected; ClientsTimeout if they never are."""
        needed = max(num_clients, min_num_clients or 0)
        if not self.wait_for(needed):
            raise ClientsTimeout(
                f"only {len(self.clients)} of the {needed} clients this round needs were connected "
                f"within REJOIN_TIMEOUT={self.wait_timeout:g} s: restart clients, or lower MIN_FIT_CLIENTS"
                " / MIN_EVALUATE_CLIENTS"
            )
        with self._cv:  # a late client is released by its answer or its request's timeout
            self._cv.wait_for(lambda: len(self._free()) >= needed, timeout=self.busy_wait)
            free = list(self._free().values())
        available = [p for p in free if criterion is None or criterion.select(p)]
        if num_clients > len(available):
            log.info("sampling failed: %d clients available, %d requested", len(available), num_clients)
            return []
        if self.poisson_rate is not None and self.phase == "fit":
            return poisson_sample(available, self.poisson_rate)
        return seeded_sample(available, num_clients, self.seed, self.round, self.phase)
