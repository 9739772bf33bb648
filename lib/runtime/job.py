"""What every job entry point runs: read the task's identity and config, skip a task that
is done, check its upstream stages, run the stage's task, turn the outcome into an exit
code.

    python -m jobs.<stage> --run-dir RUN [--stage NAME] [--task-index I]

Exit codes: 0 done (or already done), 1 a clear error (logged without a traceback),
75 stopped at a safe point on the scheduler's signal (``EX_TEMPFAIL``: not complete, not
broken; the environment has requeued it where it can), 130 interrupted.

A task of a local-path run dir holds its task lock (``lib.core.locks``) while it runs: a
second copy of it (beside an orphan of a killed launcher, or started by hand) stops with
the holder named before it touches any output. Under the local launcher a SIGTERM is the
launcher's Ctrl-C (or ``launch.py cancel``): nobody requeues the task, so it stops at
once instead of at the next safe point (every output is published whole, so nothing
half-written is left) and says it was interrupted, not preempted.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Callable

from omegaconf import DictConfig

from lib.config.compose import load_run_config
from lib.core.errors import EmbedfleetError
from lib.core.locks import task_lock
from lib.core.markers import check_marker, discard_marker
from lib.core.paths import RunPaths
from lib.core.storage import expand_scratch
from lib.plan.spec import Plan, StageSpec, require_complete
from lib.runtime import stop
from lib.runtime.context import TaskContext
from lib.runtime.environment import TaskEnvironment, current_environment
from lib.runtime.identity import ENV_LAUNCHER, ENV_RUN_DIR, TaskIdentity
from lib.runtime.logs import exit_code, setup_logging
from lib.runtime.ready import mark_ready

log = logging.getLogger("embedfleet")

EXIT_STOPPED = 75
EXIT_INTERRUPTED = 130


class LauncherInterrupt(BaseException):
    """The local launcher stopped this task (a BaseException, like KeyboardInterrupt, so
    that no ``except Exception`` on the way swallows it)."""


def _interrupt(signum: int, _frame: object) -> None:
    # Once: a second signal must not break the clean-up the first one started.
    signal.signal(signum, signal.SIG_IGN)
    raise LauncherInterrupt(signal.Signals(signum).name)


def _install_handlers(env: TaskEnvironment) -> None:
    env.install_stop_handler()
    if os.environ.get(ENV_LAUNCHER) == "local":
        signal.signal(signal.SIGTERM, _interrupt)


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


def run_stage_task(
    group: str,
    body: Callable[[TaskContext], None],
    argv: list[str] | None,
    *,
    marks_ready: bool = False,
) -> int:
    """Resolve the task, skip it if its marker is valid, else run ``body``. Returns the
    exit code. ``marks_ready``: ``body`` calls ``lib.runtime.ready.mark_ready`` itself once
    it has loaded its model; otherwise the task is ready as ``body`` begins."""
    env = current_environment()
    # First thing: a scheduler's stop warning may come at any moment (SLURM checks time
    # limits only every ~30 s); the sbatch script ignores it until this handler is set.
    _install_handlers(env)
    args = parse_args(group, argv)
    setup_logging(args.stage)
    try:
        return exit_code(lambda: _run(args, env, body, marks_ready), log)
    except LauncherInterrupt as exc:
        log.warning(
            "interrupted by the launcher (%s): finished parts are kept; rerun the same "
            "command to resume",
            exc,
        )
        return EXIT_INTERRUPTED


def _run(
    args: argparse.Namespace,
    env: TaskEnvironment,
    body: Callable[[TaskContext], None],
    marks_ready: bool = False,
) -> int:
    if not args.run_dir:
        raise EmbedfleetError(f"no run dir: pass --run-dir or set {ENV_RUN_DIR}")
    paths = RunPaths(args.run_dir)
    cfg = load_run_config(paths)
    paths = RunPaths(args.run_dir, expand_scratch(cfg.cluster.scratch_dir))
    plan = Plan.load(paths)
    spec = plan.stage(args.stage)
    identity = env.identity(
        spec.name, run_dir=paths.root, task_index=args.task_index, num_tasks=spec.num_tasks
    )
    setup_logging(identity.label())
    env.configure(cfg.cluster)
    _install_handlers(env)
    lock = paths.task_lock(spec.stage_dir, identity.task_index, identity.rank)
    with task_lock(paths.storage, lock, f"{spec.name} task {identity.task_index}"):
        return _run_task(paths, cfg, plan, spec, identity, env, body, marks_ready)


def _run_task(
    paths: RunPaths,
    cfg: DictConfig,
    plan: Plan,
    spec: StageSpec,
    identity: TaskIdentity,
    env: TaskEnvironment,
    body: Callable[[TaskContext], None],
    marks_ready: bool = False,
) -> int:
    """The task itself, under its lock: skip it if done, else check upstream and run."""
    if check_marker(paths, spec.stage_dir, identity.task_index, spec.config_hash):
        log.info(
            "task %d already has a valid completion marker; nothing to do", identity.task_index
        )
        return 0
    if identity.rank == 0:  # a stale marker (outputs changed) is replaced, not kept
        discard_marker(paths.storage, paths.marker(spec.stage_dir, identity.task_index))
    # Under SLURM this job may start after `afterany`: check the upstream markers
    # ourselves and fail clearly instead of running on missing inputs.
    for upstream in spec.depends_on:
        require_complete(paths, plan.stage(upstream), spec.name)
    if not marks_ready:
        mark_ready()
    try:
        body(TaskContext(cfg, plan, spec, identity, paths, env))
    except stop.StopRequested:
        log.warning("%s", env.after_stop())
        return EXIT_STOPPED
    return 0
