"""The ``metrics`` pipeline stage: one distributed job per k-means level.

``stages: [..., kmeans, metrics]`` plans ``metrics_level{L}`` (group ``metrics``, job
``jobs.metrics``, stage dir ``metrics/level{L}``, ``metrics.world_size`` ranks) after each
``kmeans_level{L}`` stage of the plan.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig

from lib.config import config_digest, to_plain
from lib.errors import ConfigError
from lib.pipeline import DISTRIBUTED, StageSpec, register_stage

KMEANS_STAGE = re.compile(r"^kmeans_level(\d+)$")
# Settings that change speed, placement or what is shown, not the metric values.
PERF_ONLY = {
    "levels",
    "block_rows",
    "world_size",
    "torch_threads",
    "scratch_dir",
    "output_dir",
    "resident_bytes",
    "silhouette_acc_bytes",
    "sanity_check",
    "sanity_sample",
    "sanity_rtol",
}


def metrics_stages(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    kmeans = {
        int(m.group(1)): spec
        for name, spec in prior.items()
        if (m := KMEANS_STAGE.match(name)) and spec.name == name
    }
    if not kmeans:
        raise ConfigError(
            "stages: 'metrics' measures k-means levels but the plan has no kmeans_level{L} "
            "stage before it; put kmeans before metrics (stages=[embed,merge,kmeans,metrics]) "
            "or measure an existing clustering with `python -m jobs.metrics CLUSTER`"
        )
    section = to_plain(cfg.metrics)
    for key in PERF_ONLY:
        section.pop(key, None)
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
        h = config_digest("metrics", section, level, up.config_hash)
        out.append(
            StageSpec(
                name=f"metrics_level{level}",
                group="metrics",
                job="jobs.metrics",
                stage_dir=f"metrics/level{level}",
                kind=DISTRIBUTED,
                num_tasks=1,
                config_hash=h,
                world_size=world,
                depends_on=(up.name,),
            )
        )
    return out


register_stage("metrics", metrics_stages)
