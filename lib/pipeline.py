"""The stage plan: which jobs a config runs, in which order, with how many tasks.

``build_plan(cfg, dataset_rows)`` turns the config into ``StageSpec``s. Every launcher
(local, slurm, submitit, hosts) consumes the same plan, saved as ``<run_dir>/plan.json``;
jobs read it back to learn their stage's task count and config hash.

Config hashes chain: a stage's hash covers its own config section and the hashes of the
stages it reads, so changing the model invalidates embed, merge and everything after.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lib.config import config_digest, to_plain
from lib.errors import ConfigError, UpstreamIncompleteError
from lib.fsio import atomic_write_json
from lib.markers import check_marker
from lib.sharding import compress_indices

PLAN_FILE = "plan.json"
RUN_CONFIG_FILE = "run.yaml"

ARRAY, SINGLE, DISTRIBUTED = "array", "single", "distributed"

# Keys that change speed or logging but not outputs: they stay out of the config hash so
# a resumed run may tune them.
_PERF_ONLY = {
    "embed": {"log_every_seconds", "torch_threads", "tokenize_batch_size"},
    "merge": {"chunk_rows"},
}


@dataclass(frozen=True)
class StageSpec:
    name: str  # unique within the plan: "embed", "merge", "kmeans_level1"
    group: str  # config section and resource profile: "embed", "kmeans"
    job: str  # python module run as ``python -m <job>``
    stage_dir: str  # outputs and markers under <run_dir>/<stage_dir>
    kind: str  # array | single | distributed
    num_tasks: int
    config_hash: str
    world_size: int = 1
    depends_on: tuple[str, ...] = ()
    args: tuple[str, ...] = ()

    def command(self, python: str, run_dir: Path | str) -> list[str]:
        """The task command; identity comes from the environment (lib.task)."""
        return [python, "-m", self.job, "--run-dir", str(run_dir), "--stage", self.name, *self.args]


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

    def to_json(self) -> dict[str, Any]:
        return {
            "stages": [asdict(s) for s in self.stages],
            "dataset_rows": self.dataset_rows,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        stages = [
            StageSpec(**{**s, "depends_on": tuple(s["depends_on"]), "args": tuple(s["args"])})
            for s in data["stages"]
        ]
        return cls(stages, int(data["dataset_rows"]), data.get("extra", {}))

    def save(self, run_dir: Path) -> None:
        atomic_write_json(Path(run_dir) / PLAN_FILE, self.to_json())

    @classmethod
    def load(cls, run_dir: Path) -> Plan:
        p = Path(run_dir) / PLAN_FILE
        if not p.exists():
            raise ConfigError(f"{p} does not exist: {run_dir} is not a run dir made by launch.py")
        return cls.from_json(json.loads(p.read_text()))


def section_hash(cfg: DictConfig, group: str, *upstream: str) -> str:
    section = to_plain(cfg[group]) if group in cfg else {}
    for key in _PERF_ONLY.get(group, ()):
        section.pop(key, None)
    return config_digest(group, section, *upstream)


def _embed(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    n = int(cfg.embed.num_shards)
    if n < 1:
        raise ConfigError(f"embed.num_shards must be >= 1, got {n}")
    if n > rows:
        raise ConfigError(
            f"embed.num_shards={n} is more than the {rows} rows to embed; use at most {rows}"
        )
    data = to_plain(cfg.dataset)
    model = to_plain(cfg.model)
    h = config_digest("embed", data, model, section_hash(cfg, "embed"), rows)
    return [StageSpec("embed", "embed", "jobs.embed", "embed", ARRAY, n, h)]


def _merge(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    upstream = prior.get("embed")
    deps = ("embed",) if upstream else ()
    h = section_hash(cfg, "merge", upstream.config_hash if upstream else "no-embed")
    return [StageSpec("merge", "merge", "jobs.merge", "merge", SINGLE, 1, h, depends_on=deps)]


StageBuilder = Callable[[DictConfig, int, dict[str, StageSpec]], list[StageSpec]]
STAGE_BUILDERS: dict[str, StageBuilder] = {"embed": _embed, "merge": _merge}


def register_stage(name: str, builder: StageBuilder) -> None:
    STAGE_BUILDERS[name] = builder


def build_plan(cfg: DictConfig, dataset_rows: int) -> Plan:
    """The ordered stage plan for ``cfg``. Raises ``ConfigError`` for an unknown stage."""
    prior: dict[str, StageSpec] = {}
    stages: list[StageSpec] = []
    for name in cfg.stages:
        builder = STAGE_BUILDERS.get(name)
        if builder is None:
            raise ConfigError(
                f"stages: unknown stage {name!r}; known stages: {', '.join(STAGE_BUILDERS)}"
            )
        for spec in builder(cfg, dataset_rows, prior):
            prior[spec.name] = spec
            prior.setdefault(spec.group, spec)
            stages.append(spec)
    return Plan(stages, dataset_rows)


def completed_tasks(run_dir: Path, spec: StageSpec) -> set[int]:
    """Tasks of ``spec`` with a valid marker (raises ConfigMismatchError on a foreign one)."""
    return {
        t
        for t in range(spec.num_tasks)
        if check_marker(Path(run_dir), spec.stage_dir, t, spec.config_hash) is not None
    }


def require_complete(run_dir: Path, spec: StageSpec, for_stage: str) -> None:
    """Raise ``UpstreamIncompleteError`` naming the tasks of ``spec`` without a marker."""
    missing = sorted(set(range(spec.num_tasks)) - completed_tasks(run_dir, spec))
    if missing:
        raise UpstreamIncompleteError(
            f"{for_stage} cannot start: stage {spec.name!r} has {len(missing)} of "
            f"{spec.num_tasks} task(s) without a completion marker: {compress_indices(missing)}. "
            f"See `python launch.py logs {run_dir} {spec.name} {missing[0]}`, then "
            f"`python launch.py retry {run_dir}`."
        )


# Stage builders defined in their own modules register themselves on import: the
# curation stages (kmeans levels, curate) and the metrics stage.
import lib.kmeans_stages  # noqa: E402
import lib.metrics_stage  # noqa: E402, F401
