"""A task's identity (DESIGN.md contract 1): (run dir, stage, task index, number of tasks,
rank, world size). ``lib.runtime.environment`` resolves it, one ``TaskEnvironment`` per
launcher; this module holds the identity and the variables every launcher sets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lib.core.errors import EmbedfleetError

ENV_LAUNCHER = "EMBEDFLEET_LAUNCHER"  # which TaskEnvironment resolves this process
ENV_RUN_DIR = "EMBEDFLEET_RUN_DIR"
ENV_TASK_INDEX = "EMBEDFLEET_TASK_INDEX"
ENV_TASK_OFFSET = "EMBEDFLEET_TASK_OFFSET"  # SLURM arrays split into chunks
ENV_NUM_TASKS = "EMBEDFLEET_NUM_TASKS"


class TaskIdentityError(EmbedfleetError):
    """The environment does not say which task this process is."""


@dataclass(frozen=True)
class TaskIdentity:
    run_dir: str  # a local path or an fsspec URL
    stage: str
    task_index: int
    num_tasks: int
    rank: int = 0
    world_size: int = 1

    def label(self) -> str:
        """``embed 3`` or ``kmeans_level1 0 r1``: how log lines name this process."""
        rank = f" r{self.rank}" if self.world_size > 1 else ""
        return f"{self.stage} {self.task_index}{rank}"


def env_int(env: Mapping[str, str], key: str) -> int | None:
    """``env[key]`` as an integer, None when unset or empty (``TaskIdentityError`` if not
    an integer)."""
    value = env.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise TaskIdentityError(f"environment variable {key}={value!r} is not an integer") from exc


def identity_env(identity: TaskIdentity, launcher: str) -> dict[str, str]:
    """The environment variables a launcher sets so that ``launcher``'s task environment
    resolves ``identity`` in the task process."""
    env = {
        ENV_LAUNCHER: launcher,
        ENV_RUN_DIR: str(identity.run_dir),
        ENV_TASK_INDEX: str(identity.task_index),
        ENV_NUM_TASKS: str(identity.num_tasks),
    }
    if identity.world_size > 1:
        env.update(RANK=str(identity.rank), WORLD_SIZE=str(identity.world_size))
    return env
