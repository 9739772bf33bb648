"""Submit a plan as SLURM jobs: one job array per sharded stage, one job per single or
distributed stage, chained with ``--dependency=afterany``; return at once.

- Arrays larger than the cluster's MaxArraySize (``scontrol show config``, fallback 1001)
  are split into chunks, each with an index offset (task = array index + offset). A retry
  submits only the tasks without a valid marker, as compressed index lists (``0-3,7``).
- ``afterany``, not ``afterok``: a downstream job always starts, checks the upstream
  completion markers itself and fails with the missing tasks named, instead of hanging in
  DependencyNeverSatisfied.
- Every script is saved under ``<run_dir>/slurm/`` before it is submitted, and every job
  id in ``<run_dir>/slurm/submissions.json``; ``status`` asks ``squeue`` and ``sacct`` once
  each for all of them.
- Submitting from inside a SLURM job (a sweep driver) scrubs the inherited SLURM_*,
  SBATCH_* and SRUN_* variables, except SLURM_CONF.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from launchers.base import REPO_ROOT, Launcher, LaunchResult
from launchers.slurm_render import job_name, render_array_script, render_distributed_script
from lib.config import to_plain
from lib.errors import EmbedfleetError
from lib.fsio import atomic_write_bytes, atomic_write_json
from lib.pipeline import ARRAY, DISTRIBUTED, Plan, StageSpec, completed_tasks
from lib.sharding import compress_indices

SUBMISSIONS = "submissions.json"
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


class SlurmError(EmbedfleetError):
    """sbatch/squeue/sacct failed; the message has the command and its stderr."""


def scrubbed_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without SLURM_*/SBATCH_*/SRUN_* (kept: SLURM_CONF), so a job
    submitted from inside another job does not inherit its allocation."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF")
    }
    env.update(extra or {})
    return env


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


def merged_resources(cfg: DictConfig, group: str) -> dict[str, Any]:
    """The stage's resources over the defaults (non-null values win)."""
    res = to_plain(cfg.cluster.slurm.resources)
    base = dict(res.get("default", {}))
    stage = res.get(group, {}) if group in res else {}
    for key, value in stage.items():
        if key == "additional_parameters":
            base[key] = {**(base.get(key) or {}), **(value or {})}
        elif key == "setup":
            base[key] = list(base.get(key) or []) + list(value or [])
        elif value is not None:
            base[key] = value
    return base


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


def load_submissions(run_dir: Path) -> list[Submission]:
    path = Path(run_dir) / "slurm" / SUBMISSIONS
    if not path.exists():
        return []
    return [Submission(**s) for s in json.loads(path.read_text())]


def save_submissions(run_dir: Path, subs: list[Submission]) -> None:
    atomic_write_json(Path(run_dir) / "slurm" / SUBMISSIONS, [s.__dict__ for s in subs])


def _parse_array_id(job: str) -> tuple[str, list[int] | None]:
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


class SlurmLauncher(Launcher):
    name = "slurm"

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.slurm = cfg.cluster.slurm
        self.python = cfg.cluster.python or sys.executable

    # -- rendering ----------------------------------------------------------------------

    def _script(
        self, run_dir: Path, spec: StageSpec, offset: int, indices: list[int], n: int
    ) -> tuple[Path, str]:
        log_dir = run_dir / spec.stage_dir / "logs"
        script = run_dir / "slurm" / f"{spec.name}-{n:03d}.sbatch"
        res = merged_resources(self.cfg, spec.group)
        env = {str(k): str(v) for k, v in (self.cfg.cluster.env or {}).items()}
        command = spec.command(self.python, run_dir)
        name = job_name(self.slurm.job_name_prefix, Path(run_dir).name, spec.name)
        common = dict(
            script_path=script,
            run_dir=run_dir,
            stage=spec.name,
            job_name=name,
            command=command,
            log_dir=log_dir,
            workdir=REPO_ROOT,
            resources=res,
            signal=self.slurm.signal,
            signal_delay_s=self.slurm.signal_delay_s,
            requeue=self.slurm.requeue,
            env=env,
        )
        if spec.kind == DISTRIBUTED:
            per_node = int(res.get("ntasks_per_node") or spec.world_size)
            nodes = int(res.get("nodes") or max(1, -(-spec.world_size // per_node)))
            if nodes * per_node != spec.world_size:
                raise EmbedfleetError(
                    f"{spec.name}: world size {spec.world_size} != nodes {nodes} x "
                    f"ntasks_per_node {per_node}; fix cluster.slurm.resources.{spec.group}"
                )
            text = render_distributed_script(nodes=nodes, ntasks_per_node=per_node, **common)
        else:
            array = compress_indices(indices)
            if self.slurm.array_throttle:
                array += f"%{int(self.slurm.array_throttle)}"
            tasks = [offset + i for i in indices]
            text = render_array_script(
                array=array,
                task_offset=offset,
                first_task=min(tasks),
                last_task=max(tasks),
                num_tasks=spec.num_tasks,
                **common,
            )
        return script, text

    # -- submission -----------------------------------------------------------------------

    def _live(self, subs: list[Submission]) -> dict[tuple[str, int], str]:
        """(stage, task) -> job id for tasks still queued or running."""
        if not subs:
            return {}
        view = self.queue_states(subs)
        return {
            key: job
            for key, (state, job) in view.items()
            if state in RUNNING_STATES | PENDING_STATES
        }

    def launch(self, run_dir: Path, plan: Plan, *, dry_run: bool = False) -> LaunchResult:
        run_dir = Path(run_dir)
        subs = load_submissions(run_dir)
        live = self._live(subs) if not dry_run else {}
        size = max_array_size(self.slurm.max_array_size)
        stage_jobs: dict[str, list[str]] = {}  # stage -> job ids it now waits on
        new: list[Submission] = []
        counter = len(subs)
        for spec in plan.stages:
            done = completed_tasks(run_dir, spec)
            running = {t for (stage, t) in live if stage == spec.name}
            missing = [t for t in range(spec.num_tasks) if t not in done and t not in running]
            waits = sorted({live[(spec.name, t)].split("_")[0] for t in running})
            deps = sorted({j for up in spec.depends_on for j in stage_jobs.get(up, [])})
            if not missing:
                stage_jobs[spec.name] = waits
                state = (
                    "complete" if not running else f"{len(running)} task(s) still queued/running"
                )
                print(f"{spec.name}: {state}")
                continue
            chunks = chunk_tasks(missing, size) if spec.kind == ARRAY else [(0, [0])]
            ids = list(waits)
            for offset, indices in chunks:
                counter += 1
                script, text = self._script(run_dir, spec, offset, indices, counter)
                cmd = ["sbatch", "--parsable"]
                if deps:
                    cmd.append("--dependency=afterany:" + ":".join(deps))
                cmd.append(str(script))
                log_dir = run_dir / spec.stage_dir / "logs"
                if dry_run:
                    print(f"# ---- {script}\n{text}")
                    print(f"$ cd {shlex.quote(str(log_dir))} && {shlex.join(cmd)}\n")
                    ids.append(f"<{spec.name}-{counter}>")
                    continue
                atomic_write_bytes(script, text.encode())
                log_dir.mkdir(parents=True, exist_ok=True)
                job = run_cmd(cmd, cwd=log_dir).strip().split(";")[0]
                ids.append(job)
                new.append(
                    Submission(spec.name, job, spec.kind, offset, indices, str(script), time.time())
                )
                save_submissions(run_dir, subs + new)
            stage_jobs[spec.name] = ids
            tasks = sum(len(i) for _, i in chunks)
            what = (
                f"{tasks} task(s) in {len(chunks)} array job(s)" if spec.kind == ARRAY else "1 job"
            )
            after = f", after {', '.join(deps)}" if deps else ""
            verb = "would submit" if dry_run else "submitted"
            print(f"{spec.name}: {verb} {what}: {', '.join(ids[len(waits) :])}{after}")
        return LaunchResult(complete=False, submitted=not dry_run and bool(new or live), failed={})

    # -- watching -------------------------------------------------------------------------

    def queue_states(self, subs: list[Submission]) -> dict[tuple[str, int], tuple[str, str]]:
        """(stage, task) -> (state, job id) from one squeue call, latest submission wins."""
        by_job = {s.job_id: s for s in subs}
        try:
            out = run_cmd(["squeue", "-h", "-r", "-j", ",".join(by_job), "-o", "%i|%T"])
        except SlurmError:
            return {}  # squeue errors when every job id has left the queue
        result: dict[tuple[str, int], tuple[str, str]] = {}
        for line in out.splitlines():
            if "|" not in line:
                continue
            job, state = line.split("|", 1)
            base, indices = _parse_array_id(job.strip())
            sub = by_job.get(base)
            if sub is None:
                continue
            for i in indices if indices is not None else [0]:
                result[(sub.stage, sub.task(i))] = (state.strip(), job.strip())
        return result

    def accounting(self, subs: list[Submission]) -> dict[tuple[str, int], tuple[str, str]]:
        """(stage, task) -> (state, detail) from one sacct call; later submissions win."""
        order = {s.job_id: n for n, s in enumerate(subs)}
        by_job = {s.job_id: s for s in subs}
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
            base, indices = _parse_array_id(job)
            sub = by_job.get(base)
            if sub is None:
                continue
            state = state.split()[0]
            for i in indices if indices is not None else [0]:
                key = (sub.stage, sub.task(i))
                if key not in best or order[base] >= best[key][0]:
                    best[key] = (
                        order[base],
                        state,
                        f"{state} exit {code} after {elapsed}, job {job}",
                    )
        return {k: (v[1], v[2]) for k, v in best.items()}

    def scheduler_view(self, run_dir: Path, plan: Plan) -> dict[tuple[str, int], tuple[str, str]]:
        """(stage, task) -> (done|running|pending|failed, detail): squeue first, then sacct."""
        from launchers.status import FAILED, PENDING, RUNNING

        subs = load_submissions(run_dir)
        if not subs:
            return {}
        view: dict[tuple[str, int], tuple[str, str]] = {}
        for key, (state, detail) in self.accounting(subs).items():
            if state in FAILED_STATES:
                view[key] = (FAILED, detail)
            elif state == "COMPLETED":
                view[key] = (FAILED, f"{detail}, but no valid completion marker")
            elif state in RUNNING_STATES:
                view[key] = (RUNNING, detail)
            else:
                view[key] = (PENDING, detail)
        for key, (state, job) in self.queue_states(subs).items():
            if state in RUNNING_STATES:
                view[key] = (RUNNING, f"job {job}")
            elif state in PENDING_STATES:
                view[key] = (PENDING, f"job {job} {state.lower()}")
        return view

    def cancel(self, run_dir: Path, plan: Plan) -> int:
        subs = load_submissions(run_dir)
        if not subs:
            return 0
        run_cmd(["scancel", *sorted({s.job_id for s in subs})])
        return len({s.job_id for s in subs})
