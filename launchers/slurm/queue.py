"""Talking to SLURM: sbatch/squeue/sacct/scancel, the run's submission records, and what
the queue says about each task. Shared by the ``slurm`` and ``submitit`` launchers.

Every job id of a run is recorded in ``<run_dir>/slurm/submissions.json``; ``status`` asks
``squeue`` and ``sacct`` once each for all of them. Submitting from inside a SLURM job (a
sweep driver) scrubs the inherited SLURM_*, SBATCH_* and SRUN_* variables, except
SLURM_CONF.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from launchers.base import FAILED, PENDING, RUNNING, SchedulerView
from lib.core.errors import EmbedfleetError
from lib.core.paths import RunPaths

DEFAULT_MAX_ARRAY_SIZE = 1001
RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}
PENDING_STATES = {
    "PENDING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "SUSPENDED",
    "RESV_DEL_HOLD",
}
FAILED_STATES = {
    "FAILED",
    "TIMEOUT",
    "CANCELLED",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "REVOKED",
}
_INHERITED = ("SLURM_", "SBATCH_", "SRUN_")


class SlurmError(EmbedfleetError):
    """sbatch/squeue/sacct failed; the message has the command and its stderr."""


def _inherited(key: str) -> bool:
    return key.startswith(_INHERITED) and key != "SLURM_CONF"


def scrubbed_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without SLURM_*/SBATCH_*/SRUN_* (kept: SLURM_CONF), so a job
    submitted from inside another job does not inherit its allocation."""
    env = {k: v for k, v in os.environ.items() if not _inherited(k)}
    env.update(extra or {})
    return env


@contextlib.contextmanager
def scrubbed_environ(extra: dict[str, str] | None = None) -> Iterator[None]:
    """While a library (submitit) calls sbatch from this process: hide an enclosing job's
    SLURM_*/SBATCH_*/SRUN_* variables and set ``extra`` (what the jobs must inherit);
    afterwards the environment is as it was."""
    extra = extra or {}
    hidden = {k: os.environ.pop(k) for k in list(os.environ) if _inherited(k)}
    replaced = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in replaced.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.environ.update(hidden)


def run_cmd(cmd: list[str], *, cwd: Path | None = None, timeout: float = 120) -> str:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=scrubbed_env(), capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError as exc:
        raise SlurmError(
            f"{cmd[0]} not found: is this a SLURM login node? (try `make slurm-up` for the test "
            "cluster, or cluster=local)"
        ) from exc
    if proc.returncode != 0:
        raise SlurmError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def max_array_size(configured: int | None) -> int:
    """MaxArraySize: configured, else from ``scontrol show config``, else 1001."""
    if configured:
        return int(configured)
    try:
        out = run_cmd(["scontrol", "show", "config"], timeout=30)
    except SlurmError:
        return DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(m.group(1)) if m else DEFAULT_MAX_ARRAY_SIZE


def chunk_tasks(tasks: list[int], size: int) -> list[tuple[int, list[int]]]:
    """Group task indices into (offset, array indices) chunks with every index < ``size``."""
    groups: dict[int, list[int]] = {}
    for t in sorted(set(tasks)):
        offset = (t // size) * size
        groups.setdefault(offset, []).append(t - offset)
    return sorted(groups.items())


@dataclass
class Submission:
    stage: str
    job_id: str
    kind: str
    offset: int
    indices: list[int]  # array indices (task = offset + index); [0] for single jobs
    script: str
    submitted_at: float
    # submitit arrays map index i to an arbitrary task list; sbatch arrays use offset + i.
    tasks_by_index: list[int] | None = None

    def task(self, index: int) -> int:
        return self.tasks_by_index[index] if self.tasks_by_index else self.offset + index


def load_submissions(run: RunPaths | str | Path) -> list[Submission]:
    paths = run if isinstance(run, RunPaths) else RunPaths(run)
    data = paths.storage.read_json(paths.slurm_submissions)
    return [Submission(**s) for s in data] if data else []


def save_submissions(paths: RunPaths, subs: list[Submission]) -> None:
    paths.storage.publish_json(paths.slurm_submissions, [asdict(s) for s in subs])


def parse_array_id(job: str) -> tuple[str, list[int] | None]:
    """``123_7`` -> ("123", [7]); ``123_[8-10,12%2]`` -> ("123", [8, 9, 10, 12]); ``123``."""
    if "_" not in job:
        return job, None
    base, rest = job.split("_", 1)
    rest = rest.strip("[]").split("%")[0]
    out: list[int] = []
    for part in rest.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return base, out


def queue_states(subs: list[Submission]) -> dict[tuple[str, int], tuple[str, str]]:
    """(stage, task) -> (state, job id) from one squeue call, latest submission wins."""
    by_job = {s.job_id: s for s in subs}
    if not by_job:
        return {}
    try:
        out = run_cmd(["squeue", "-h", "-r", "-j", ",".join(by_job), "-o", "%i|%T"])
    except SlurmError:
        return {}  # squeue errors when every job id has left the queue
    result: dict[tuple[str, int], tuple[str, str]] = {}
    for line in out.splitlines():
        if "|" not in line:
            continue
        job, state = line.split("|", 1)
        base, indices = parse_array_id(job.strip())
        sub = by_job.get(base)
        if sub is None:
            continue
        for i in indices if indices is not None else [0]:
            result[(sub.stage, sub.task(i))] = (state.strip(), job.strip())
    return result


def accounting(subs: list[Submission]) -> dict[tuple[str, int], tuple[str, str]]:
    """(stage, task) -> (state, detail) from one sacct call; later submissions win."""
    order = {s.job_id: n for n, s in enumerate(subs)}
    by_job = {s.job_id: s for s in subs}
    if not by_job:
        return {}
    try:
        out = run_cmd(
            [
                "sacct",
                "-X",
                "-n",
                "-P",
                "-j",
                ",".join(by_job),
                "-o",
                "JobID,State,ExitCode,Elapsed",
            ]
        )
    except SlurmError:
        return {}
    best: dict[tuple[str, int], tuple[int, str, str]] = {}
    for line in out.splitlines():
        fields = line.split("|")
        if len(fields) < 4:
            continue
        job, state, code, elapsed = fields[:4]
        base, indices = parse_array_id(job)
        sub = by_job.get(base)
        if sub is None:
            continue
        state = state.split()[0]
        for i in indices if indices is not None else [0]:
            key = (sub.stage, sub.task(i))
            if key not in best or order[base] >= best[key][0]:
                best[key] = (order[base], state, f"{state} exit {code} after {elapsed}, job {job}")
    return {k: (v[1], v[2]) for k, v in best.items()}


def live_tasks(subs: list[Submission]) -> dict[tuple[str, int], str]:
    """(stage, task) -> job id for tasks still queued or running."""
    return {
        key: job
        for key, (state, job) in queue_states(subs).items()
        if state in RUNNING_STATES | PENDING_STATES
    }


def scheduler_view(subs: list[Submission]) -> SchedulerView:
    """(stage, task) -> (running|pending|failed, detail): sacct first, then squeue."""
    view: SchedulerView = {}
    for key, (state, detail) in accounting(subs).items():
        if state in FAILED_STATES:
            view[key] = (FAILED, detail)
        elif state == "COMPLETED":
            view[key] = (FAILED, f"{detail}, but no valid completion marker")
        elif state in RUNNING_STATES:
            view[key] = (RUNNING, detail)
        else:
            view[key] = (PENDING, detail)
    for key, (state, job) in queue_states(subs).items():
        if state in RUNNING_STATES:
            view[key] = (RUNNING, f"job {job}")
        elif state in PENDING_STATES:
            view[key] = (PENDING, f"job {job} {state.lower()}")
    return view


def cancel(subs: list[Submission]) -> int:
    """scancel every job of ``subs``; return how many."""
    ids = sorted({s.job_id for s in subs})
    if ids:
        run_cmd(["scancel", *ids])
    return len(ids)
