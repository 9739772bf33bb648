"""Submit a plan through submitit: Python-callable arrays (``map_array``) on SLURM, or
submitit's LocalExecutor when no SLURM is present.

Each task calls the same job entry point as every other launcher (``jobs.<stage>.main``)
with its task index, so outputs are identical. On SLURM stages chain with
``afterany`` dependencies and ``launch`` returns at once; the LocalExecutor cannot express
dependencies, so there stages run one after another and ``launch`` waits.

submitit ships the callable to the workers by pickling it: that is our own function and
its arguments, written by this process into the run dir, never user data. In the worker,
``EMBEDFLEET_LAUNCHER=submitit`` selects the submitit task environment (rank, world and
hosts from submitit's own ``JobEnvironment``).

Secrets are never among the pickled arguments (they are files in the run dir): a secret
literal in ``cluster.env`` is refused as with cluster=slurm, ``cluster.pass_env`` names
reach the workers through the environment of the submitting process (sbatch exports it;
the LocalExecutor's processes inherit it), and ``cluster.env_file`` is sourced by the job
(a setup line on SLURM; read into that environment for the LocalExecutor).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from typing import Any

from omegaconf import DictConfig

from launchers.base import Launcher, LaunchResult, SchedulerView
from launchers.slurm import queue
from launchers.slurm.queue import Submission, load_submissions, save_submissions
from launchers.slurm.render import quote
from launchers.slurm.resources import merged_resources, node_layout, require_shared_run_dir
from lib.config.redact import env_file_values, refuse_secret_literals, task_env
from lib.core.errors import EmbedfleetError
from lib.core.paths import RunPaths
from lib.core.repo import REPO_ROOT
from lib.plan.spec import ARRAY, DISTRIBUTED, Plan, StageSpec, completed_tasks
from lib.runtime.identity import ENV_LAUNCHER
from lib.runtime.slurm import parse_duration


def run_task(run_dir: str, stage: str, module: str, task_index: int, env: dict[str, str]) -> None:
    """Run one task in a submitit worker (the same entry point as ``python -m``)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    os.environ.update(env)
    os.environ[ENV_LAUNCHER] = "submitit"
    job = importlib.import_module(module)
    code = job.main(["--run-dir", run_dir, "--stage", stage, "--task-index", str(task_index)])
    if code != 0:
        raise RuntimeError(
            f"{stage} task {task_index} failed (exit code {code}); see "
            f"`python launch.py logs {run_dir} {stage} {task_index}`"
        )


def _params(cfg: DictConfig, spec: StageSpec) -> dict[str, Any]:
    """submitit parameters from the stage's SLURM resources (same config as cluster=slurm)."""
    res = merged_resources(cfg, spec.group)
    slurm = cfg.cluster.slurm
    p: dict[str, Any] = {"name": f"{slurm.job_name_prefix}-{spec.name}"}
    if res.get("time"):
        p["timeout_min"] = max(1, int((parse_duration(str(res["time"])) or 3600) // 60))
    mapping = {
        "partition": "slurm_partition",
        "account": "slurm_account",
        "qos": "slurm_qos",
        "cpus_per_task": "cpus_per_task",
        "gpus_per_node": "gpus_per_node",
        "mem": "slurm_mem",
        "mem_per_cpu": "slurm_mem_per_cpu",
        "constraint": "slurm_constraint",
        "exclude": "slurm_exclude",
    }
    for key, name in mapping.items():
        if res.get(key) is not None:
            p[name] = res[key]
    if spec.kind == DISTRIBUTED:
        p["nodes"], p["tasks_per_node"] = node_layout(spec, res)
    if slurm.array_throttle:
        p["slurm_array_parallelism"] = int(slurm.array_throttle)
    p["slurm_signal_delay_s"] = int(slurm.signal_delay_s)
    p["slurm_additional_parameters"] = dict(res.get("additional_parameters") or {})
    p["slurm_setup"] = list(res.get("setup") or [])
    return p


class SubmititLauncher(Launcher):
    name = "submitit"

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        import submitit

        self.submitit = submitit
        self.backend = "slurm" if submitit.SlurmExecutor.affinity() > 0 else "local"
        refuse_secret_literals(cfg.cluster, self.name)
        self.env_file: str | None = None

    def _executor(self, paths: RunPaths, spec: StageSpec, deps: list[str]):
        folder = paths.storage.local_file(paths.submitit_folder(spec.name))
        executor = self.submitit.AutoExecutor(folder=folder, cluster=self.backend)
        params = _params(self.cfg, spec)
        if self.backend == "slurm":
            if deps:
                params["slurm_additional_parameters"]["dependency"] = "afterany:" + ":".join(deps)
            if self.env_file:
                # Only the file's path is written into submitit's sbatch script.
                params["slurm_setup"] = [*params["slurm_setup"], f"source {quote(self.env_file)}"]
            executor.update_parameters(**params)
        else:
            executor.update_parameters(
                timeout_min=params.get("timeout_min", 60),
                **(
                    {"nodes": 1, "tasks_per_node": params["tasks_per_node"]}
                    if spec.kind == DISTRIBUTED
                    else {}
                ),
            )
        return executor

    def launch(self, paths: RunPaths, plan: Plan, *, dry_run: bool = False) -> LaunchResult:
        require_shared_run_dir(paths.root, self.name)
        run_dir = paths.root
        env = {
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            )
        }
        tenv = task_env(
            self.cfg.cluster, literal_secrets=False, launcher=self.name, check_environ=not dry_run
        )
        env.update(tenv.plain)  # pickled into the run dir with run_task's arguments
        self.env_file = tenv.env_file
        # Inherited, not pickled: the forwarded secrets are already in os.environ.
        inherited = dict(tenv.secret)
        if tenv.env_file and self.backend == "local" and not dry_run:
            inherited.update(env_file_values(tenv.env_file))
        subs = load_submissions(paths)
        stage_jobs: dict[str, list[str]] = {}
        failed: dict[str, list[int]] = {}
        size = (
            queue.max_array_size(self.cfg.cluster.slurm.max_array_size)
            if self.backend == "slurm"
            else 10**9
        )
        # submitit calls sbatch from this process: hide an enclosing job's allocation.
        with queue.scrubbed_environ({**env, **inherited}):
            for spec in plan.stages:
                done = completed_tasks(paths, spec)
                missing = [t for t in range(spec.num_tasks) if t not in done]
                if not missing:
                    print(f"{spec.name}: complete")
                    stage_jobs[spec.name] = []
                    continue
                deps = sorted({j for up in spec.depends_on for j in stage_jobs.get(up, [])})
                if dry_run:
                    print(
                        f"{spec.name}: would submit tasks {missing} via submitit ({self.backend})"
                    )
                    stage_jobs[spec.name] = [f"<{spec.name}>"]
                    continue
                jobs = []
                if spec.kind == ARRAY:
                    for start in range(0, len(missing), size):
                        chunk = missing[start : start + size]
                        executor = self._executor(paths, spec, deps)
                        n = len(chunk)
                        chunk_jobs = executor.map_array(
                            run_task,
                            [str(run_dir)] * n,
                            [spec.name] * n,
                            [spec.job] * n,
                            chunk,
                            [env] * n,
                        )
                        jobs.extend(chunk_jobs)
                        base = str(chunk_jobs[0].job_id).split("_")[0]
                        subs.append(
                            Submission(
                                spec.name,
                                base,
                                spec.kind,
                                0,
                                list(range(n)),
                                "submitit",
                                time.time(),
                                tasks_by_index=chunk,
                            )
                        )
                else:
                    executor = self._executor(paths, spec, deps)
                    job = executor.submit(run_task, str(run_dir), spec.name, spec.job, 0, env)
                    jobs.append(job)
                    subs.append(
                        Submission(
                            spec.name, str(job.job_id), spec.kind, 0, [0], "submitit", time.time()
                        )
                    )
                save_submissions(paths, subs)
                ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
                stage_jobs[spec.name] = ids
                print(
                    f"{spec.name}: submitted {len(missing)} task(s) via submitit ({self.backend}): {', '.join(ids)}"
                )
                if self.backend == "local":
                    # No dependencies without a scheduler: wait for this stage.
                    bad = []
                    for task, job in zip(missing if spec.kind == ARRAY else [0], jobs, strict=True):
                        try:
                            job.result()
                        except Exception as exc:  # submitit re-raises the task's error
                            bad.append(task)
                            print(
                                f"[{spec.name} {task}] FAILED: {str(exc).strip().splitlines()[-1]}"
                            )
                    if bad:
                        failed[spec.name] = bad
                        return LaunchResult(False, False, failed)
        if self.backend == "local":
            return LaunchResult(not dry_run, False, failed)
        return LaunchResult(False, not dry_run, failed)

    def scheduler_view(self, paths: RunPaths, plan: Plan) -> SchedulerView:
        if self.backend != "slurm":
            return {}  # the local executor's jobs ended with the launching process
        return queue.scheduler_view(load_submissions(paths))

    def cancel(self, paths: RunPaths, plan: Plan) -> int:
        if self.backend != "slurm":
            raise EmbedfleetError("cancel: submitit's local executor jobs end with this process")
        return queue.cancel(load_submissions(paths))
