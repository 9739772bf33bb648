"""Submit a plan as SLURM jobs: one job array per sharded stage, one job per single or
distributed stage, chained with ``--dependency=afterany``; return at once.

- Arrays larger than the cluster's MaxArraySize (``scontrol show config``, fallback 1001)
  are split into chunks, each with an index offset (task = array index + offset). A retry
  submits only the tasks without a valid marker, as compressed index lists (``0-3,7``).
- ``afterany``, not ``afterok``: a downstream job always starts, checks the upstream
  completion markers itself and fails with the missing tasks named, instead of hanging in
  DependencyNeverSatisfied.
- Every script is saved under ``<run_dir>/slurm/`` before it is submitted, and every job
  id in ``<run_dir>/slurm/submissions.json`` (``launchers.slurm.queue``); ``status`` asks
  ``squeue`` and ``sacct`` once each for all of them.
- The run dir must be on a file system the nodes share: sbatch writes the logs there.
- No secret is written into a script: ``cluster.pass_env`` names are forwarded from the
  environment sbatch runs in (``--export``), ``cluster.env_file`` is sourced by the job, and
  a secret literal in ``cluster.env`` is refused when the launcher is made (before
  ``run.yaml``); a retry forwards the same names from its own environment again.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from launchers.base import Launcher, LaunchResult, SchedulerView
from launchers.slurm import queue
from launchers.slurm.queue import Submission, chunk_tasks, load_submissions, save_submissions
from launchers.slurm.render import job_name, render_array_script, render_distributed_script
from launchers.slurm.resources import merged_resources, node_layout, require_shared_run_dir
from lib.config.redact import TaskEnv, refuse_secret_literals, task_env
from lib.core.paths import RunPaths
from lib.core.repo import REPO_ROOT
from lib.core.sharding import compress_indices
from lib.plan.spec import ARRAY, DISTRIBUTED, Plan, StageSpec, completed_tasks


class SlurmLauncher(Launcher):
    name = "slurm"

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.slurm = cfg.cluster.slurm
        self.python = cfg.cluster.python or sys.executable
        refuse_secret_literals(cfg.cluster, self.name)
        self.env = TaskEnv()  # set by launch: read from the environment then

    # -- rendering ----------------------------------------------------------------------

    def _script(
        self, paths: RunPaths, spec: StageSpec, offset: int, indices: list[int], n: int
    ) -> tuple[Path, str]:
        base = Path(paths.root)  # a shared local path (require_shared_run_dir)
        script = base / paths.slurm_script(spec.name, n)
        res = merged_resources(self.cfg, spec.group)
        command = spec.command(self.python, paths.root)
        name = job_name(self.slurm.job_name_prefix, Path(paths.root).name, spec.name)
        common = dict(
            script_path=script,
            run_dir=paths.root,
            stage=spec.name,
            job_name=name,
            command=command,
            log_dir=base / paths.logs(spec.stage_dir),
            workdir=REPO_ROOT,
            resources=res,
            signal=self.slurm.signal,
            signal_delay_s=self.slurm.signal_delay_s,
            requeue=self.slurm.requeue,
            env=self.env.plain,
            forward=self.env.forwarded,
            env_file=self.env.env_file,
        )
        if spec.kind == DISTRIBUTED:
            nodes, per_node = node_layout(spec, res)
            text = render_distributed_script(
                nodes=nodes,
                ntasks_per_node=per_node,
                rank_log=base / paths.log(spec.stage_dir, 0, rank="%t"),
                **common,
            )
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
                log_file_format=paths.log_file_format(),
                **common,
            )
        return script, text

    # -- submission -----------------------------------------------------------------------

    def launch(self, paths: RunPaths, plan: Plan, *, dry_run: bool = False) -> LaunchResult:
        require_shared_run_dir(paths.root, self.name)
        # A dry run may plan on a machine without the secrets; a submission needs them.
        self.env = task_env(
            self.cfg.cluster, literal_secrets=False, launcher=self.name, check_environ=not dry_run
        )
        subs = load_submissions(paths)
        live = queue.live_tasks(subs) if not dry_run else {}
        size = queue.max_array_size(self.slurm.max_array_size)
        stage_jobs: dict[str, list[str]] = {}  # stage -> job ids it now waits on
        new: list[Submission] = []
        counter = len(subs)
        base = Path(paths.root)
        for spec in plan.stages:
            done = completed_tasks(paths, spec)
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
                script, text = self._script(paths, spec, offset, indices, counter)
                cmd = ["sbatch", "--parsable"]
                if deps:
                    cmd.append("--dependency=afterany:" + ":".join(deps))
                cmd.append(str(script))
                log_dir = base / paths.logs(spec.stage_dir)
                if dry_run:
                    print(f"# ---- {script}\n{text}")
                    print(f"$ cd {shlex.quote(str(log_dir))} && {shlex.join(cmd)}\n")
                    ids.append(f"<{spec.name}-{counter}>")
                    continue
                paths.storage.publish_bytes(paths.slurm_script(spec.name, counter), text.encode())
                log_dir.mkdir(parents=True, exist_ok=True)
                job = queue.run_cmd(cmd, cwd=log_dir).strip().split(";")[0]
                ids.append(job)
                new.append(
                    Submission(spec.name, job, spec.kind, offset, indices, str(script), time.time())
                )
                save_submissions(paths, subs + new)
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

    def scheduler_view(self, paths: RunPaths, plan: Plan) -> SchedulerView:
        return queue.scheduler_view(load_submissions(paths))

    def cancel(self, paths: RunPaths, plan: Plan) -> int:
        return queue.cancel(load_submissions(paths))
