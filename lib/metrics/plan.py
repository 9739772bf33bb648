"""The metrics stage in a plan: one distributed job per k-means level.

``stages: [..., kmeans, metrics]`` plans ``metrics_level{L}`` (group ``metrics``, job
``jobs.metrics_level``, stage dir ``metrics/level{L}``, ``metrics.world_size`` ranks)
after each ``kmeans_level{L}`` stage of the plan.
"""

from __future__ import annotations

from omegaconf import DictConfig

from lib.config.fields import hashed_values
from lib.core.errors import ConfigError
from lib.core.hashing import config_digest
from lib.core.paths import (
    is_level_stage,
    level_of,
    metrics_level_dir,
    metrics_level_stage,
)
from lib.metrics.params import MetricsParams
from lib.plan.spec import DISTRIBUTED, StageSpec


def metrics_hash(params: MetricsParams | DictConfig, level: int, kmeans_level_hash: str) -> str:
    """The config hash of the metrics of a level whose k-means hashes to ``kmeans_level_hash``."""
    return config_digest("metrics", hashed_values(MetricsParams, params), level, kmeans_level_hash)


def build(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    kmeans = {
        level_of(name): spec
        for name, spec in prior.items()
        if is_level_stage(name) and spec.name == name
    }
    if not kmeans:
        raise ConfigError(
            "stages: 'metrics' measures k-means levels but the plan has no kmeans_level{L} "
            "stage before it; put kmeans before metrics (stages=[embed,merge,kmeans,metrics]) "
            "or measure an existing clustering with `python -m jobs.metrics CLUSTER`"
        )
    wanted = list(cfg.metrics.levels) if cfg.metrics.levels else sorted(kmeans)
    missing = [lvl for lvl in wanted if lvl not in kmeans]
    if missing:
        raise ConfigError(
            f"metrics.levels={wanted}: no k-means stage for level(s) {missing}; the plan has "
            f"levels {sorted(kmeans)}"
        )
    world = int(cfg.metrics.world_size)
    if world < 1:
        raise ConfigError(f"metrics.world_size must be >= 1, got {world}")
    out = []
    for level in wanted:
        up = kmeans[level]
        out.append(
            StageSpec(
                name=metrics_level_stage(level),
                group="metrics",
                job="jobs.metrics_level",
                stage_dir=metrics_level_dir(level),
                kind=DISTRIBUTED,
                num_tasks=1,
                config_hash=metrics_hash(cfg.metrics, level, up.config_hash),
                world_size=world,
                depends_on=(up.name,),
            )
        )
    return out
