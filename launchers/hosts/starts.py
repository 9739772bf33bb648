"""When the hosts launcher may send a task's start (``cluster.multihost.start_stagger_s``).

Many machines starting at the same moment can overwhelm a dataset or model server: the
sends of task starts are spaced by at least ``start_stagger_s`` seconds, across the
stages and retries of one launch. The wait happens on the thread that sends the start
(one of ``max_concurrent_starts``), not in the scheduling loop, which keeps placing,
probing and noticing signals meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class StartClock:
    """Hands out send times at least ``stagger_s`` apart, one caller at a time."""

    def __init__(self, stagger_s: float) -> None:
        self.stagger_s = float(stagger_s)
        self._lock = threading.Lock()
        self._last: float | None = None

    def turn(self, stopped: Callable[[], bool] = lambda: False) -> float | None:
        """Wait until ``stagger_s`` after the previous turn; return this turn's time
        (``time.time()``, when the start may be sent), or None if ``stopped()`` became
        true while waiting (the start is then not sent)."""
        with self._lock:
            if self._last is not None and self.stagger_s > 0:
                due = self._last + self.stagger_s
                while (now := time.time()) < due:
                    if stopped():
                        return None
                    time.sleep(min(0.1, due - now))
            if stopped():
                return None
            self._last = time.time()
            return self._last
