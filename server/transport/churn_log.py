"""The server's lines about clients joining and leaving, readable at a thousand clients.

Each join and leave is a line of its own while they are few: the first CHURN_LINES of every
CHURN_WINDOW seconds. In a storm (a thousand logical clients joining at once, or leaving at the
end of a run) the rest of the window's joins and leaves are counted instead, and one line says
how many at the window's end, with the number connected then; each of them is still logged at
DEBUG. So a run of three clients logs as before, and one of a thousand does not bury its rounds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("flowerpot.server")

CHURN_LINES = 20
CHURN_WINDOW = 5.0


class ChurnLog:
    def __init__(self, connected: Callable[[], int], lines: int = CHURN_LINES, window: float = CHURN_WINDOW) -> None:
        self.connected, self.lines, self.window = connected, lines, window
        self._lock = threading.Lock()
        self._started = float("-inf")
        self._said = 0
        self._counted = {"joined": 0, "left": 0}
        self._timer: threading.Timer | None = None

    def note(self, who: str, event: str) -> None:
        """`event` ("joined" or "left") of the client `who`, just now."""
        with self._lock:
            now = time.monotonic()
            if now - self._started >= self.window:
                self._summary_locked()
                self._started, self._said = now, 0
            own_line = self._said < self.lines
            if own_line:
                self._said += 1
            else:
                self._counted[event] += 1
                if self._timer is None:  # said at the window's end even if nothing else happens
                    self._timer = threading.Timer(self._started + self.window - now, self.flush)
                    self._timer.daemon = True
                    self._timer.start()
        log.log(
            logging.INFO if own_line else logging.DEBUG, "client %s %s (%d connected)", who, event, self.connected()
        )

    def flush(self) -> None:
        with self._lock:
            self._summary_locked()

    def _summary_locked(self) -> None:
        joined, left = self._counted["joined"], self._counted["left"]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if joined or left:
            self._counted = {"joined": 0, "left": 0}
            log.info(
                "and %d more client(s) joined, %d left, within %g s (%d connected); each at LOG_LEVEL=DEBUG",
                joined, left, self.window, self.connected(),
            )  # fmt: skip
