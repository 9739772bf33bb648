"""Stopping at a safe point when the scheduler says so, and coming back.

SLURM sends ``cluster.slurm.signal`` (USR2 by default) ``signal_delay_s`` before a job's
time limit, and SIGTERM when it preempts or requeues it. The handlers here only set a
flag; long loops call ``check()`` at safe points (after a part of a shard is published,
between k-means steps), which raises ``StopRequested``. The job entry point then decides:
on the warning signal it requeues itself (``scontrol requeue``) unless the task has already
been restarted ``max_restarts`` times; on SIGTERM the scheduler is already taking the job
away. Nothing half-written is left: every output is published atomically, so a stopped
task leaves only finished parts and its next run continues from them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from lib.errors import EmbedfleetError

log = logging.getLogger(__name__)

_state: dict[str, object] = {"signal": None, "at": None}
STARTED = time.time()


class StopRequested(Exception):
    """A stop signal arrived; raised at the next safe point."""

    def __init__(self, signame: str) -> None:
        super().__init__(f"stop requested by {signame}")
        self.signame = signame


class RestartLimitError(EmbedfleetError):
    """A task was restarted more often than ``max_restarts``."""


def _handler(signum: int, _frame) -> None:
    name = signal.Signals(signum).name
    if _state["signal"] is None:
        _state.update(signal=name, at=time.time())
        log.warning("received %s: stopping at the next safe point", name)


def install(warning_signal: str = "USR2") -> None:
    """Catch the pre-time-limit warning signal and SIGTERM (main thread only)."""
    name = warning_signal if warning_signal.startswith("SIG") else f"SIG{warning_signal}"
    signal.signal(getattr(signal, name), _handler)
    signal.signal(signal.SIGTERM, _handler)


def requested() -> str | None:
    return _state["signal"]  # type: ignore[return-value]


def check() -> None:
    """Raise ``StopRequested`` if a stop signal arrived (call at safe points)."""
    if _state["signal"] is not None:
        raise StopRequested(str(_state["signal"]))


def reset() -> None:
    _state.update(signal=None, at=None)


@dataclass
class SlurmJob:
    job_id: str  # "123" or "123_7" for an array task
    restart_count: int
    time_left_s: float | None


def _seconds(text: str) -> float | None:
    """SLURM duration ([d-]hh:mm:ss, mm:ss) -> seconds; None for UNLIMITED/invalid."""
    text = text.strip()
    if not text or text in ("UNLIMITED", "NOT_SET", "INVALID"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts[-3:]
    return days * 86400 + h * 3600 + m * 60 + s


def current_slurm_job() -> SlurmJob | None:
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return None
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job_id = env["SLURM_JOB_ID"]
    left = None
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", env["SLURM_JOB_ID"], "-o", "%L"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        left = _seconds(out.splitlines()[0]) if out else None
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return SlurmJob(job_id, int(env.get("SLURM_RESTART_COUNT") or 0), left)


def classify(job: SlurmJob | None, signame: str, signal_delay_s: float) -> str:
    """'timeout' if the signal came with the time limit near, else 'preemption'."""
    if job is not None and job.time_left_s is not None:
        # The warning signal is sent signal_delay_s before the limit (SLURM checks every
        # ~30 s); anything that leaves more time than that plus slack is a preemption.
        return "timeout" if job.time_left_s <= signal_delay_s + 90 else "preemption"
    return "preemption" if signame == "SIGTERM" else "timeout"


def requeue_self(max_restarts: int, signal_delay_s: float) -> str:
    """Requeue this SLURM task after a stop signal; return a message for the log.

    Raises ``RestartLimitError`` when the task already used ``max_restarts`` restarts.
    """
    job = current_slurm_job()
    signame = requested() or "?"
    kind = classify(job, signame, signal_delay_s)
    if job is None:
        return f"stopped by {signame} ({kind}) outside SLURM: relaunch to continue"
    if signame == "SIGTERM":
        return f"stopped by SIGTERM ({kind}): SLURM is requeueing or cancelling job {job.job_id}"
    if job.restart_count >= max_restarts:
        hint = (
            "raise the stage's time limit (cluster.slurm.resources.<stage>.time)"
            if kind == "timeout"
            else "the job keeps being preempted; use another partition/qos"
        )
        raise RestartLimitError(
            f"job {job.job_id} stopped by {signame} ({kind}) after {job.restart_count} "
            f"restart(s), the limit (cluster.slurm.max_restarts={max_restarts}): {hint}"
        )
    subprocess.run(["scontrol", "requeue", job.job_id], check=True, capture_output=True, timeout=60)
    return (
        f"{kind}: requeued job {job.job_id} (restart {job.restart_count + 1} of at most "
        f"{max_restarts}); it resumes from its finished parts"
    )
