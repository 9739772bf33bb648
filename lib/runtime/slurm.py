"""The SLURM task environment: identity from the array and step variables, rendezvous from
the allocation, and self-requeue after the time-limit warning.

SLURM sends ``cluster.slurm.signal`` (USR2) ``signal_delay_s`` before a job's time limit
and SIGTERM when it preempts or requeues it. After the warning signal reaches a safe
point, the task requeues itself (``scontrol requeue``) unless it was already restarted
``cluster.slurm.max_restarts`` times; after SIGTERM the scheduler is already taking the
job away. Time-out and preemption are told apart by the time the job has left.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Any

from lib.core.errors import EmbedfleetError
from lib.runtime import stop
from lib.runtime.environment import TaskEnvironment, port_for_job
from lib.runtime.identity import ENV_TASK_OFFSET, env_int


class RestartLimitError(EmbedfleetError):
    """A task was restarted more often than ``max_restarts``."""


@dataclass
class SlurmJob:
    job_id: str  # "123" or "123_7" for an array task
    restart_count: int
    time_left_s: float | None


def parse_duration(text: str) -> float | None:
    """SLURM duration (``[d-]hh:mm:ss``, ``mm:ss``) -> seconds; None for UNLIMITED/invalid."""
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


def first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist (``node[01-04],gpu7`` -> ``node01``)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def classify(job: SlurmJob | None, signame: str, signal_delay_s: float) -> str:
    """'timeout' if the signal came with the time limit near, else 'preemption'."""
    if job is not None and job.time_left_s is not None:
        # The warning signal is sent signal_delay_s before the limit (SLURM checks every
        # ~30 s); anything that leaves more time than that plus slack is a preemption.
        return "timeout" if job.time_left_s <= signal_delay_s + 90 else "preemption"
    return "preemption" if signame == "SIGTERM" else "timeout"


class SlurmEnvironment(TaskEnvironment):
    """Tasks of sbatch arrays and srun steps (the ``slurm`` launcher, or a script of ours
    submitted by hand, such as ``jobs/metrics.slurm``)."""

    name = "slurm"

    def __init__(self, env=None) -> None:
        super().__init__(env)
        self.signal = "USR2"
        self.signal_delay_s = 120.0
        self.max_restarts = 3

    def configure(self, cluster: Any) -> None:
        slurm = cluster.slurm
        self.signal = str(slurm.signal)
        self.signal_delay_s = float(slurm.signal_delay_s)
        self.max_restarts = int(slurm.max_restarts)

    def scheduler_index(self) -> int | None:
        array_id = env_int(self.env, "SLURM_ARRAY_TASK_ID")
        if array_id is None:
            return None
        return array_id + (env_int(self.env, ENV_TASK_OFFSET) or 0)

    def scheduler_rank_world(self) -> tuple[int, int] | None:
        rank, world = env_int(self.env, "SLURM_PROCID"), env_int(self.env, "SLURM_NTASKS")
        return (rank, world) if rank is not None and world is not None else None

    def local_rank(self) -> int:
        for key in ("LOCAL_RANK", "SLURM_LOCALID"):
            value = env_int(self.env, key)
            if value is not None:
                return value
        return 0

    def scheduler_rendezvous(self) -> tuple[str | None, int | None]:
        _, world = self.rank_world()
        addr = None
        if world > 1 and "SLURM_JOB_NODELIST" in self.env:
            addr = first_host(self.env["SLURM_JOB_NODELIST"])
        job = env_int(self.env, "SLURM_JOB_ID")
        return addr, port_for_job(job) if job is not None else None

    def stop_signal(self) -> str:
        return self.signal

    def current_job(self) -> SlurmJob | None:
        env = self.env
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
            left = parse_duration(out.splitlines()[0]) if out else None
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        return SlurmJob(job_id, int(env.get("SLURM_RESTART_COUNT") or 0), left)

    def after_stop(self) -> str:
        """Requeue this task after a stop signal; return a message for the log.

        Raises ``RestartLimitError`` when the task already used ``max_restarts`` restarts.
        Only rank 0 of a distributed job requeues it (one requeue per job)."""
        job = self.current_job()
        signame = stop.requested() or "?"
        kind = classify(job, signame, self.signal_delay_s)
        if job is None:
            return super().after_stop()
        if signame == "SIGTERM":
            return (
                f"stopped by SIGTERM ({kind}): SLURM is requeueing or cancelling job {job.job_id}"
            )
        if self.rank_world()[0] != 0:
            return f"stopped by {signame} ({kind}); rank 0 requeues job {job.job_id}"
        if job.restart_count >= self.max_restarts:
            hint = (
                "raise the stage's time limit (cluster.slurm.resources.<stage>.time)"
                if kind == "timeout"
                else "the job keeps being preempted; use another partition/qos"
            )
            raise RestartLimitError(
                f"job {job.job_id} stopped by {signame} ({kind}) after {job.restart_count} "
                f"restart(s), the limit (cluster.slurm.max_restarts={self.max_restarts}): {hint}"
            )
        subprocess.run(
            ["scontrol", "requeue", job.job_id],
            check=True,
            capture_output=True,
            timeout=60,
            env={**os.environ, **self.env},
        )
        return (
            f"{kind}: requeued job {job.job_id} (restart {job.restart_count + 1} of at most "
            f"{self.max_restarts}); it resumes from its finished parts"
        )
