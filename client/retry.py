"""The client's retry policy: how long to wait before trying the server again, and when to stop.

Kept apart from the gRPC wiring so that the policy itself can be read and tested: waits double
from FIRST_DELAY up to MAX_BACKOFF, and no wait is granted that would end past CONNECT_TIMEOUT
from the start (or from the last lost connection, after `restart`). Refusals never reach it:
the wiring raises them at once, since trying again would only be refused again.
"""

from __future__ import annotations

import time

FIRST_DELAY = 0.5
MAX_BACKOFF = 5.0


class Backoff:
    def __init__(self, budget: float, first: float = FIRST_DELAY, longest: float = MAX_BACKOFF) -> None:
        self.budget, self.first, self.longest = budget, first, longest
        self.restart()

    def restart(self) -> None:
        """Count CONNECT_TIMEOUT afresh and start again from the shortest wait."""
        self.deadline = time.monotonic() + self.budget
        self.delay = self.first

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def next_delay(self) -> float | None:
        """The wait before the next try, or None when it would end past the deadline: give up."""
        if self.delay > self.remaining():
            return None
        delay, self.delay = self.delay, min(self.delay * 2, self.longest)
        return delay
