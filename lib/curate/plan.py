"""The curate stage in a plan: one task after the top k-means level."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from lib.config.fields import hashed_values, to_params
from lib.core.errors import ConfigError
from lib.core.hashing import config_digest
from lib.core.paths import (
    CURATE_STAGE,
    CURATED_DIR,
    RunPaths,
    is_level_stage,
    kmeans_level_stage,
    level_of,
)
from lib.curate.params import CurateParams
from lib.plan.spec import SINGLE, StageSpec


def curate_hash(params: CurateParams, n_levels: int, top_level_hash: str) -> str:
    """The config hash of a curated set drawn from ``n_levels`` levels whose top level
    hashes to ``top_level_hash``."""
    return config_digest("curate", hashed_values(CurateParams, params), n_levels, top_level_hash)


def curate_params(cfg: DictConfig) -> CurateParams:
    params = to_params(cfg.curate, CurateParams)
    params.validate()
    return params


def metadata_source(cfg: DictConfig, paths: RunPaths) -> str | Path | None:
    """Row metadata of the clustered matrix: ``curate.metadata_path`` (a local path),
    else the merge stage's ``metadata.parquet`` (a name in the run dir; none for an
    external embeddings file)."""
    if cfg.curate.metadata_path:
        return Path(cfg.curate.metadata_path).expanduser()
    if cfg.kmeans.embeddings_path:
        return None
    return paths.merge_metadata


def build(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    params = curate_params(cfg)
    levels = sorted(level_of(name) for name in prior if is_level_stage(name))
    if not levels:
        raise ConfigError(
            "stages: curate samples from the k-means hierarchy; put kmeans before curate in "
            "`stages`"
        )
    top = prior[kmeans_level_stage(levels[-1])]
    if rows and params.target_size > rows * params.multiplier and not cfg.kmeans.embeddings_path:
        raise ConfigError(
            f"curate.target_size={params.target_size} is more than the {rows} rows in the "
            f"dataset (x curate.multiplier {params.multiplier}); lower curate.target_size or "
            "raise curate.multiplier"
        )
    h = curate_hash(params, len(levels), top.config_hash)
    return [
        StageSpec(
            CURATE_STAGE, "curate", "jobs.curate", CURATED_DIR, SINGLE, 1, h, depends_on=(top.name,)
        )
    ]
