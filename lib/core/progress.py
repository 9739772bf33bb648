"""Progress on long work: a tqdm bar on a terminal, periodic log lines otherwise.

Under a launcher a task's output goes to a log file, where bars are noise; there it logs
``done/total (rate/s)`` every ``every_seconds`` (bytes: MB, MB/s and the ETA), which ``launch.py logs`` and the local
launcher's console echo show.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(
        self,
        total: int,
        what: str,
        log: logging.Logger,
        every_seconds: float = 10.0,
        unit: str = "row",  # "B": bytes, shown scaled (KB, MB, ...)
    ) -> None:
        self.total, self.what, self.log, self.every = total, what, log, every_seconds
        self.unit = unit
        self.done = 0
        self.start = self.last = time.monotonic()
        self.bar = (
            tqdm(total=total, desc=what, unit=unit, unit_scale=unit == "B")
            if sys.stderr.isatty()
            else None
        )

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every and self.unit == "B":
            self.last = now
            eta = (self.total - self.done) / self.rate if self.rate > 0 else float("inf")
            self.log.info(
                "%s: %.1f/%.1f MB (%.1f MB/s, ETA %s)",
                self.what,
                self.done / 1e6,
                self.total / 1e6,
                self.rate / 1e6,
                f"{eta:.0f} s" if eta != float("inf") else "?",
            )
        elif now - self.last >= self.every:
            self.last = now
            units = self.unit if self.unit == "B" else f"{self.unit}s"
            self.log.info(
                "%s: %d/%d %s (%.1f %s/s)",
                self.what,
                self.done,
                self.total,
                units,
                self.rate,
                units,
            )

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def rate(self) -> float:
        return self.done / max(self.elapsed, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
