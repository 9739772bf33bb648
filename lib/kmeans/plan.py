"""The k-means levels in a plan: one distributed job per level, chained.

``stages: [embed, merge, kmeans, ...]`` expands ``kmeans`` into one stage per level::

    kmeans_level1  group kmeans  job jobs.kmeans  stage_dir kmeans/level1  after merge
    kmeans_level2  group kmeans  job jobs.kmeans  stage_dir kmeans/level2  after kmeans_level1

Each level job runs ``kmeans.world_size`` ranks. Hashes chain: a level's hash covers its
own settings (``KmeansParams.level_values``) and its input's hash: the merge stage's, or
the identity of ``kmeans.embeddings_path``, for level 1; level L-1's for level L. So
changing level 2 leaves level 1 complete. The settings are validated here, at launch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from lib.config.fields import to_params, to_plain
from lib.core.errors import ConfigError, DatasetError
from lib.core.hashing import config_digest
from lib.core.paths import RunPaths, kmeans_level_dir, kmeans_level_stage
from lib.kmeans.params import KmeansBackend, KmeansParams
from lib.plan.spec import DISTRIBUTED, StageSpec


def level_hash(params: KmeansParams, level: int, upstream: str) -> str:
    """The config hash of level ``level`` whose input hashes to ``upstream``."""
    return config_digest("kmeans", params.level_values(level), upstream)


def embeddings_identity(path: str | Path, data: np.ndarray) -> str:
    """The hash of an embeddings file as a level-1 input: its path, shape and dtype."""
    return config_digest("embeddings", str(path), list(data.shape), str(data.dtype))


def kmeans_params(cfg: DictConfig) -> KmeansParams:
    """The validated ``kmeans`` node (``ConfigError`` names the key)."""
    params = to_params(cfg.kmeans, KmeansParams)
    params.validate()
    return params


def embeddings_source(cfg: DictConfig, paths: RunPaths) -> Path:
    """A local file of the matrix level 1 clusters: ``kmeans.embeddings_path``, else the
    merge output (a cached copy when the run dir is on an object store)."""
    if cfg.kmeans.embeddings_path:
        return Path(cfg.kmeans.embeddings_path).expanduser()
    formats = [str(f) for f in to_plain(cfg.merge)["formats"]]
    if not formats:
        raise ConfigError("merge.formats is empty; k-means reads the merged embeddings")
    return paths.storage.local_path(paths.merge_embeddings(formats[0]))


def _external(path: Path) -> np.ndarray:
    from lib.formats.arrays import open_embeddings

    try:
        return open_embeddings(path)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"kmeans.embeddings_path={path}: {exc}") from exc


def build(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    params = kmeans_params(cfg)
    world = int(cfg.kmeans.world_size)
    if world < 1:
        raise ConfigError(f"kmeans.world_size must be >= 1, got {world}")
    if params.backend == KmeansBackend.faiss and world > 1:
        raise ConfigError(
            f"kmeans.backend=faiss runs in one process but kmeans.world_size={world}; "
            "use kmeans.backend=torch or kmeans.world_size=1"
        )
    if cfg.kmeans.embeddings_path:
        path = Path(cfg.kmeans.embeddings_path).expanduser().absolute()
        data = _external(path)
        points = int(data.shape[0])
        where = f"rows of {path}"
        deps: tuple[str, ...] = ()
        upstream = embeddings_identity(path, data)
    else:
        merge = prior.get("merge")
        if merge is None:
            raise ConfigError(
                "stages: kmeans reads the merge stage's embeddings; put merge before kmeans in "
                "`stages`, or set kmeans.embeddings_path=/path/to/embeddings.safetensors"
            )
        points = rows  # an upper bound: the embed stage may drop over-long rows
        where = "rows in the dataset"
        deps = ("merge",)
        upstream = merge.config_hash
    k1 = params.per_level("n_clusters", 1)
    if points and k1 > points:
        raise ConfigError(
            f"kmeans.n_clusters[0]={k1} is larger than the {points} {where}: level 1 cannot "
            f"have more clusters than points; lower kmeans.n_clusters[0] to at most {points}"
        )
    specs = []
    for level in range(1, params.levels() + 1):
        h = level_hash(params, level, upstream)
        specs.append(
            StageSpec(
                kmeans_level_stage(level),
                "kmeans",
                "jobs.kmeans",
                kmeans_level_dir(level),
                DISTRIBUTED,
                1,
                h,
                world_size=world,
                depends_on=deps,
            )
        )
        deps, upstream = (kmeans_level_stage(level),), h
    return specs
