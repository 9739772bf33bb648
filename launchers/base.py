"""The launcher interface and the per-attempt records launchers write.

A launcher turns the same plan into running tasks (processes, sbatch jobs, ...). It has
three jobs: ``launch`` (start every task without a valid marker), ``cancel`` (stop the
run's tasks) and ``scheduler_view`` (what its scheduler says about tasks that are not
done, for ``status``). Completion markers stay the truth; the scheduler's view is
advisory: it tells running from failed from pending and where the logs are.

``start`` is what ``launch.py`` and ``retry`` call: ``launch`` itself, except in a launcher
whose scheduling loop can go on in the background (hosts, tpu_vm: it starts a detached
scheduler holding the run lock and returns once tasks run). ``scheduler_alive`` and
``status_notes`` let ``wait`` and ``status`` speak about such a process.

An attempt record ``<stage dir>/attempts/task_XXXXX.json`` says who ran a task last
(launcher, host, pids or job id, start, end, return code; a local launcher adds each
pid's ``process_start`` so that a reused pid is never taken for the task).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from lib.core.locks import RunLock
from lib.core.paths import RunPaths
from lib.plan.spec import Plan, StageSpec

# What a foreground launcher counts instead of dying of while its tasks run.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_signals_to(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Route the stop signals to ``handler`` while the block runs, then restore the
    handlers. Main thread only (a launcher started from another thread keeps the
    process's handlers); under ``nohup`` SIGHUP stays ignored: the run is meant to
    outlive the terminal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {
        s: signal.signal(s, handler)
        for s in STOP_SIGNALS
        if not (s == signal.SIGHUP and signal.getsignal(s) is signal.SIG_IGN)
    }
    try:
        yield
    finally:
        for s, previous in saved.items():
            signal.signal(s, previous)


# What status shows for a task; "done" only ever comes from a valid completion marker.
DONE, RUNNING, FAILED, PENDING = "done", "running", "failed", "pending"

SchedulerView = dict[tuple[str, int], tuple[str, str]]  # (stage, task) -> (state, detail)


def write_attempt(paths: RunPaths, spec: StageSpec, task: int, **fields: Any) -> None:
    name = paths.attempt(spec.stage_dir, task)
    record = paths.storage.read_json(name) or {}
    record.update(fields)
    paths.storage.publish_json(name, record)


def read_attempt(paths: RunPaths, spec: StageSpec, task: int) -> dict[str, Any] | None:
    return paths.storage.read_json(paths.attempt(spec.stage_dir, task))


@dataclass
class LaunchResult:
    complete: bool  # every stage finished (a launcher that waits)
    submitted: bool  # work was handed to a scheduler and is still running
    failed: dict[str, list[int]]  # stage -> failed tasks
    # Ctrl-C (or SIGTERM/SIGHUP) of a launcher that waits: how many tasks it stopped
    # (already said on the console); None when not interrupted. Exit code 130.
    interrupted: int | None = None


@dataclass(frozen=True)
class LiveLog:
    """A task's log as read from where it is being written (``Launcher.live_log``)."""

    data: bytes
    source: str  # where it was read, for the user: "host n1: /w/runs/r/embed/logs/..."


class Launcher(ABC):
    """Turns a plan into running tasks. ``launch`` only runs tasks without a valid marker."""

    name = "base"

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def launch(self, paths: RunPaths, plan: Plan, *, dry_run: bool = False) -> LaunchResult:
        """Run (or submit) every task of ``plan`` without a valid marker, in stage order."""

    def start(
        self, paths: RunPaths, plan: Plan, *, dry_run: bool = False, lock: RunLock | None = None
    ) -> LaunchResult:
        """What the command line runs: ``launch``. ``lock``: the run lock the caller holds,
        for a launcher that hands it to a background process of its own."""
        return self.launch(paths, plan, dry_run=dry_run)

    def scheduler_alive(self, paths: RunPaths) -> bool | None:
        """Whether a process of this launcher still drives the run (starts tasks, retries
        them, runs the next stage): None when the launcher has none of its own (the launch
        is the run, or a cluster's scheduler drives it) or it cannot be told from here."""
        return None

    def status_notes(self, paths: RunPaths, plan: Plan) -> list[str]:
        """Lines ``status`` prints below its table (after ``scheduler_view``)."""
        return []

    def live_log(self, paths: RunPaths, spec: StageSpec, task: int, rank: int) -> LiveLog | None:
        """For ``logs``: the log of ``task`` (``rank``) read from elsewhere than the run dir
        while it is written there (a host's own run dir); None: the run dir's copy is it."""
        return None

    @abstractmethod
    def cancel(self, paths: RunPaths, plan: Plan) -> int:
        """Stop every running task of the run; return how many jobs/processes were told."""

    @abstractmethod
    def scheduler_view(self, paths: RunPaths, plan: Plan) -> SchedulerView:
        """(stage, task) -> (running|pending|failed, detail) for tasks the launcher knows
        about; tasks it does not mention are pending."""
