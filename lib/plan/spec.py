"""The stage plan: which jobs a config runs, in which order, with how many tasks.

Every launcher (local, slurm, submitit) consumes the same ``Plan``, saved as
``<run_dir>/plan.json``; jobs read it back to learn their stage's task count and config
hash. Config hashes chain: a stage's hash covers its own settings and the hashes of the
stages it reads, so changing the model invalidates embed, merge and everything after.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lib.core.errors import ConfigError, UpstreamIncompleteError
from lib.core.markers import completed_tasks as _completed
from lib.core.paths import RunPaths
from lib.core.sharding import compress_indices

ARRAY, SINGLE, DISTRIBUTED = "array", "single", "distributed"


@dataclass(frozen=True)
class StageSpec:
    name: str  # unique within the plan: "embed", "merge", "kmeans_level1"
    group: str  # config section and resource profile: "embed", "kmeans"
    job: str  # python module run as ``python -m <job>``
    stage_dir: str  # outputs and markers under <run_dir>/<stage_dir> (lib.core.paths)
    kind: str  # array | single | distributed
    num_tasks: int
    config_hash: str
    world_size: int = 1
    depends_on: tuple[str, ...] = ()
    args: tuple[str, ...] = ()

    def command(self, python: str, run_dir: str | Path) -> list[str]:
        """The task command; identity comes from the environment (lib.runtime)."""
        return [python, "-m", self.job, "--run-dir", str(run_dir), "--stage", self.name, *self.args]

    def log(self, task: int, rank: int = 0) -> str:
        """The name of a task's log; a distributed stage has one per rank."""
        return RunPaths.log(self.stage_dir, task, rank if self.kind == DISTRIBUTED else None)


def _paths(run: RunPaths | str | Path) -> RunPaths:
    return run if isinstance(run, RunPaths) else RunPaths(run)


@dataclass
class Plan:
    stages: list[StageSpec]
    dataset_rows: int
    extra: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(
            f"no stage {name!r} in this run's plan; stages: {', '.join(s.name for s in self.stages)}"
        )

    def group(self, group: str) -> list[StageSpec]:
        """The stages of one config group, in plan order (``kmeans`` -> its levels)."""
        return [s for s in self.stages if s.group == group]

    def to_json(self) -> dict[str, Any]:
        return {
            "stages": [asdict(s) for s in self.stages],
            "dataset_rows": self.dataset_rows,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        known = {f.name for f in fields(StageSpec)}
        stages = [
            StageSpec(
                **{
                    **{k: v for k, v in s.items() if k in known},
                    "depends_on": tuple(s.get("depends_on", ())),
                    "args": tuple(s.get("args", ())),
                }
            )
            for s in data["stages"]
        ]
        return cls(stages, int(data["dataset_rows"]), data.get("extra", {}))

    def save(self, run: RunPaths | str | Path) -> None:
        paths = _paths(run)
        paths.storage.publish_json(paths.plan, self.to_json())

    @classmethod
    def load(cls, run: RunPaths | str | Path) -> Plan:
        paths = _paths(run)
        try:
            data = json.loads(paths.storage.read_bytes(paths.plan))
        except FileNotFoundError:
            raise ConfigError(
                f"{paths.url(paths.plan)} does not exist: {paths.root} is not a run dir made "
                "by launch.py"
            ) from None
        return cls.from_json(data)


def completed_tasks(run: RunPaths | str | Path, spec: StageSpec) -> set[int]:
    """Tasks of ``spec`` with a valid marker (raises ConfigMismatchError on a foreign one)."""
    return _completed(_paths(run), spec.stage_dir, spec.num_tasks, spec.config_hash)


def require_complete(run: RunPaths | str | Path, spec: StageSpec, for_stage: str) -> None:
    """Raise ``UpstreamIncompleteError`` naming the tasks of ``spec`` without a marker."""
    paths = _paths(run)
    missing = sorted(set(range(spec.num_tasks)) - completed_tasks(paths, spec))
    if missing:
        raise UpstreamIncompleteError(
            f"{for_stage} cannot start: stage {spec.name!r} has {len(missing)} of "
            f"{spec.num_tasks} task(s) without a completion marker: {compress_indices(missing)}. "
            f"See `python launch.py logs {paths.root} {spec.name} {missing[0]}`, then "
            f"`python launch.py retry {paths.root}`."
        )
