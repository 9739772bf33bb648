"""Stopping at a safe point when the scheduler says so.

A scheduler sends a warning signal before a time limit (SLURM: ``cluster.slurm.signal``,
USR2 by default) and SIGTERM when it preempts or requeues a job. The handlers here only
set a flag; long loops call ``check()`` at safe points (after a part of a shard is
published, between k-means steps), which raises ``StopRequested``. What happens next (a
requeue, a message to relaunch) is the task environment's decision
(``TaskEnvironment.after_stop``). Nothing half-written is left: every output is published
whole, so a stopped task leaves only finished parts and its next run continues from them.
"""

from __future__ import annotations

import logging
import signal
import time

log = logging.getLogger(__name__)

_state: dict[str, object] = {"signal": None, "at": None}


class StopRequested(Exception):
    """A stop signal arrived; raised at the next safe point."""

    def __init__(self, signame: str) -> None:
        super().__init__(f"stop requested by {signame}")
        self.signame = signame


def _handler(signum: int, _frame) -> None:
    name = signal.Signals(signum).name
    if _state["signal"] is None:
        _state.update(signal=name, at=time.time())
        log.warning("received %s: stopping at the next safe point", name)


def signal_name(name: str) -> str:
    """``USR2`` / ``SIGUSR2`` -> ``SIGUSR2``."""
    return name if name.startswith("SIG") else f"SIG{name}"


def install(warning_signal: str = "USR2") -> None:
    """Catch the warning signal and SIGTERM (main thread only)."""
    signal.signal(getattr(signal, signal_name(warning_signal)), _handler)
    signal.signal(signal.SIGTERM, _handler)


def requested() -> str | None:
    """The name of the first stop signal received, or None."""
    return _state["signal"]  # type: ignore[return-value]


def check() -> None:
    """Raise ``StopRequested`` if a stop signal arrived (call at safe points)."""
    if _state["signal"] is not None:
        raise StopRequested(str(_state["signal"]))


def reset() -> None:
    _state.update(signal=None, at=None)
