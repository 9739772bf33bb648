"""A task's identity (DESIGN.md contract 1), read the same way under every launcher.

Identity = (run dir, stage, task index, number of tasks, rank, world size). Launchers
deliver it through the environment or CLI flags; this module resolves it in one place:

- task index: ``--task-index`` > ``EMBEDFLEET_TASK_INDEX`` >
  ``SLURM_ARRAY_TASK_ID + EMBEDFLEET_TASK_OFFSET`` (arrays split into chunks) >
  TPU worker id (``TPU_WORKER_ID`` / ``CLOUD_TPU_TASK_ID``) > 0.
- rank/world: ``RANK``/``WORLD_SIZE`` (torchrun, local launcher) >
  ``SLURM_PROCID``/``SLURM_NTASKS`` (srun) > 0/1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lib.errors import EmbedfleetError

ENV_RUN_DIR = "EMBEDFLEET_RUN_DIR"
ENV_STAGE = "EMBEDFLEET_STAGE"
ENV_TASK_INDEX = "EMBEDFLEET_TASK_INDEX"
ENV_TASK_OFFSET = "EMBEDFLEET_TASK_OFFSET"
ENV_NUM_TASKS = "EMBEDFLEET_NUM_TASKS"


class TaskIdentityError(EmbedfleetError):
    """The environment does not say which task this process is."""


@dataclass(frozen=True)
class TaskIdentity:
    run_dir: Path
    stage: str
    task_index: int
    num_tasks: int
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def as_env(self) -> dict[str, str]:
        """Environment variables that reproduce this identity in a child process."""
        env = {
            ENV_RUN_DIR: str(self.run_dir),
            ENV_STAGE: self.stage,
            ENV_TASK_INDEX: str(self.task_index),
            ENV_NUM_TASKS: str(self.num_tasks),
        }
        if self.world_size > 1:
            env.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size))
        return env


def _int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise TaskIdentityError(f"environment variable {key}={value!r} is not an integer") from exc


def resolve_task_index(env: Mapping[str, str], explicit: int | None = None) -> int:
    if explicit is not None:
        return explicit
    for key in (ENV_TASK_INDEX,):
        if (v := _int(env, key)) is not None:
            return v
    if (array_id := _int(env, "SLURM_ARRAY_TASK_ID")) is not None:
        return array_id + (_int(env, ENV_TASK_OFFSET) or 0)
    for key in ("TPU_WORKER_ID", "CLOUD_TPU_TASK_ID"):
        if (v := _int(env, key)) is not None:
            return v
    return 0


def resolve_rank_world(env: Mapping[str, str]) -> tuple[int, int]:
    """(rank, world size) from torchrun-style or SLURM variables; (0, 1) when neither."""
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if rank is not None and world is not None:
        return rank, world
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
    if rank is not None and world is not None:
        return rank, world
    return 0, 1


def resolve_identity(
    stage: str,
    *,
    run_dir: str | Path | None = None,
    task_index: int | None = None,
    num_tasks: int | None = None,
    env: Mapping[str, str] | None = None,
) -> TaskIdentity:
    """Build the identity of this process for ``stage``.

    Raises ``TaskIdentityError`` if the run dir is unknown or the index is out of range.
    """
    env = os.environ if env is None else env
    rd = run_dir if run_dir is not None else env.get(ENV_RUN_DIR)
    if not rd:
        raise TaskIdentityError(
            f"no run dir: pass --run-dir or set {ENV_RUN_DIR} (launch.py does this for you)"
        )
    index = resolve_task_index(env, task_index)
    total = num_tasks if num_tasks is not None else _int(env, ENV_NUM_TASKS)
    rank, world = resolve_rank_world(env)
    if total is not None and not 0 <= index < total:
        raise TaskIdentityError(f"task index {index} is outside 0..{total - 1} for stage {stage}")
    return TaskIdentity(Path(rd), stage, index, total if total is not None else 1, rank, world)


# Set by the local launcher per concurrent task (its share of the cores), so that backends
# that pin threads (vLLM's CPU build) never put two tasks on one core.
ENV_CPU_CORES = "EMBEDFLEET_CPU_CORES"


def usable_cores() -> list[int]:
    """The cores this process may run on: its affinity mask (a SLURM allocation's cgroup,
    a taskset), or all cores where the OS has no such mask."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))
