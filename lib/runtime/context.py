"""What a stage's task gets from the job runner (``lib.runtime.job``)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from lib.core.paths import RunPaths
from lib.plan.spec import Plan, StageSpec
from lib.runtime.environment import TaskEnvironment
from lib.runtime.identity import TaskIdentity


@dataclass
class TaskContext:
    """The run's config and plan, the task's stage and identity, the run dir's names and
    storage, and the task's environment."""

    cfg: DictConfig
    plan: Plan
    spec: StageSpec
    identity: TaskIdentity
    paths: RunPaths
    env: TaskEnvironment

    @property
    def stage_dir(self) -> str:
        return self.spec.stage_dir
