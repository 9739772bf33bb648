"""What every job entry point shares: arguments, logging, identity, error reporting."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from lib import preempt
from lib.config import load_run_config
from lib.errors import EmbedfleetError
from lib.markers import check_marker
from lib.pipeline import RUN_CONFIG_FILE, Plan, StageSpec, require_complete
from lib.task import ENV_RUN_DIR, TaskIdentity, resolve_identity

log = logging.getLogger("embedfleet")

# A task that stopped at a safe point on the scheduler's signal (and requeued itself when
# it could): not complete, not broken. 75 is EX_TEMPFAIL ("try again later").
EXIT_STOPPED = 75


@dataclass
class JobContext:
    cfg: DictConfig
    plan: Plan
    spec: StageSpec
    identity: TaskIdentity

    @property
    def run_dir(self) -> Path:
        return self.identity.run_dir


def setup_logging(label: str) -> None:
    logging.basicConfig(
        level=os.environ.get("EMBEDFLEET_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s [{label}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "fsspec", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_args(group: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m jobs.{group}",
        description=f"Run one task of the {group} stage of an embedfleet run. The task's "
        "identity comes from the flags or the environment (EMBEDFLEET_TASK_INDEX, "
        "SLURM_ARRAY_TASK_ID, RANK/WORLD_SIZE, ...); launch.py sets these for you.",
    )
    p.add_argument("--run-dir", default=os.environ.get(ENV_RUN_DIR), help="the run directory")
    p.add_argument("--stage", default=group, help="stage name in the run's plan.json")
    p.add_argument("--task-index", type=int, default=None, help="task index (0-based)")
    return p.parse_args(argv)


def run_job(group: str, body: Callable[[JobContext], None], argv: list[str] | None = None) -> int:
    """Resolve the task, skip it if its marker is valid, else run ``body``. Returns exit code."""
    # First thing: a scheduler's stop warning may come at any moment (SLURM checks time
    # limits only every ~30 s); the sbatch script ignores it until this handler is set.
    preempt.install("USR2")
    args = parse_args(group, argv)
    setup_logging(args.stage)
    try:
        if not args.run_dir:
            raise EmbedfleetError(f"no run dir: pass --run-dir or set {ENV_RUN_DIR}")
        run_dir = Path(args.run_dir)
        cfg = load_run_config(run_dir / RUN_CONFIG_FILE)
        plan = Plan.load(run_dir)
        spec = plan.stage(args.stage)
        identity = resolve_identity(
            spec.name, run_dir=run_dir, task_index=args.task_index, num_tasks=spec.num_tasks
        )
        setup_logging(
            f"{spec.name} {identity.task_index}"
            + (f" r{identity.rank}" if identity.world_size > 1 else "")
        )
        if check_marker(run_dir, spec.stage_dir, identity.task_index, spec.config_hash):
            log.info(
                "task %d already has a valid completion marker; nothing to do", identity.task_index
            )
            return 0
        # Under SLURM this job may start after `afterany`: check the upstream markers
        # ourselves and fail clearly instead of running on missing inputs.
        for upstream in spec.depends_on:
            require_complete(run_dir, plan.stage(upstream), spec.name)
        slurm = cfg.cluster.slurm
        preempt.install(slurm.signal)
        try:
            body(JobContext(cfg, plan, spec, identity))
        except preempt.StopRequested:
            if identity.rank == 0:  # one requeue per job, not one per rank
                log.warning("%s", preempt.requeue_self(slurm.max_restarts, slurm.signal_delay_s))
            return EXIT_STOPPED
        return 0
    except EmbedfleetError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
