"""Plan builders of the curation stages: hierarchical k-means, one job per level, then curate.

``stages: [embed, merge, kmeans, curate]`` expands ``kmeans`` into one distributed stage per
level and ``curate`` into one single-task stage::

    kmeans_level1  group kmeans  job jobs.kmeans  stage_dir kmeans/level1  after merge
    kmeans_level2  group kmeans  job jobs.kmeans  stage_dir kmeans/level2  after kmeans_level1
    ...
    curate         group curate  job jobs.curate  stage_dir kmeans/curated after the top level

Each level job runs ``world_size`` ranks (``kmeans.world_size``). Config hashes chain: a
level's hash covers its own settings (``HierarchyParams.level_json``) and the previous
level's hash (level 1: the merge stage's, or the embeddings file's path), so changing
level 2 leaves level 1 complete. The settings are validated here, at launch, through
``HierarchyParams.from_mapping`` / ``SamplingParams.from_mapping``, so a bad list fails
before anything runs; the level and curate jobs write their markers with the stage's hash
(``run_level(stage_hash=...)``), which is what the launchers check.

Importing this module registers the builders with ``lib.pipeline``; it imports torch only
when a plan has a k-means stage.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from lib.config import config_digest, to_plain
from lib.errors import ConfigError, DatasetError
from lib.pipeline import DISTRIBUTED, SINGLE, StageSpec, register_stage

if TYPE_CHECKING:
    from lib.hierarchical_kmeans import HierarchyParams
    from lib.hierarchical_sampling import SamplingParams

LEVEL_PREFIX = "kmeans_level"
CURATE_STAGE = "curate"
# Keys of the kmeans section that say where and how a level runs, not what it computes.
JOB_KEYS = ("world_size", "device", "embeddings_path")
_BROADCAST = ("n_resampling_steps", "sample_size", "n_splits")
MERGE_FILES = {"safetensors": "embeddings.safetensors", "npy": "embeddings.npy"}


def level_stage(level: int) -> str:
    return f"{LEVEL_PREFIX}{level}"


def level_of(stage_name: str) -> int:
    """``kmeans_level3`` -> 3. Raises ``ConfigError`` for another name."""
    m = re.fullmatch(rf"{LEVEL_PREFIX}(\d+)", stage_name)
    if not m:
        raise ConfigError(
            f"stage {stage_name!r} is not a k-means level stage (expected {LEVEL_PREFIX}<L>)"
        )
    return int(m.group(1))


def hierarchy_mapping(section: dict[str, Any]) -> dict[str, Any]:
    """The ``kmeans`` config section as ``HierarchyParams`` fields: job keys dropped,
    ``n_levels: null`` -> ``len(n_clusters)``, one-entry lists repeated for every level."""
    values = {k: v for k, v in section.items() if k not in JOB_KEYS}
    n = values.get("n_levels")
    if n is None:
        n = len(values.get("n_clusters") or [])
    values["n_levels"] = int(n)
    for key in _BROADCAST:
        v = values.get(key)
        if isinstance(v, list) and len(v) == 1 and n > 1:
            values[key] = v * n
    return values


def hierarchy_params(cfg: DictConfig) -> HierarchyParams:
    """Validated ``HierarchyParams`` of ``cfg.kmeans`` (``ConfigError`` names the key)."""
    from lib.hierarchical_kmeans import HierarchyParams

    return HierarchyParams.from_mapping(hierarchy_mapping(to_plain(cfg.kmeans)))


def sampling_params(cfg: DictConfig) -> SamplingParams:
    from lib.hierarchical_sampling import SamplingParams

    section = {k: v for k, v in to_plain(cfg.curate).items() if k != "metadata_path"}
    try:
        return SamplingParams.from_mapping(section)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("sampling ", "curate.", 1)) from None


def embeddings_source(cfg: DictConfig, run_dir: Path) -> Path:
    """The matrix level 1 clusters: ``kmeans.embeddings_path``, else the merge output."""
    if cfg.kmeans.embeddings_path:
        return Path(cfg.kmeans.embeddings_path).expanduser()
    formats = [str(f) for f in to_plain(cfg.merge)["formats"]]
    if not formats:
        raise ConfigError("merge.formats is empty; k-means reads the merged embeddings")
    return Path(run_dir) / "merge" / MERGE_FILES[formats[0]]


def metadata_source(cfg: DictConfig, run_dir: Path) -> Path | None:
    """Row metadata of the clustered matrix: ``curate.metadata_path``, else the merge
    stage's ``metadata.parquet`` (none for an external embeddings file without one)."""
    if cfg.curate.metadata_path:
        return Path(cfg.curate.metadata_path).expanduser()
    if cfg.kmeans.embeddings_path:
        return None
    return Path(run_dir) / "merge" / "metadata.parquet"


def _external_rows(path: Path) -> int:
    from lib.arrays import open_embeddings

    try:
        return int(open_embeddings(path).shape[0])
    except (OSError, ValueError) as exc:
        raise DatasetError(f"kmeans.embeddings_path={path}: {exc}") from exc


def _kmeans(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    params = hierarchy_params(cfg)
    world = int(cfg.kmeans.world_size)
    if world < 1:
        raise ConfigError(f"kmeans.world_size must be >= 1, got {world}")
    if params.backend == "faiss" and world > 1:
        raise ConfigError(
            f"kmeans.backend=faiss runs in one process but kmeans.world_size={world}; "
            "use kmeans.backend=torch or kmeans.world_size=1"
        )
    if cfg.kmeans.embeddings_path:
        path = Path(cfg.kmeans.embeddings_path).expanduser().absolute()
        points = _external_rows(path)
        where = f"rows of {path}"
        deps: tuple[str, ...] = ()
        upstream = config_digest("embeddings", str(path))
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
    k1 = params.n_clusters[0]
    if points and k1 > points:
        raise ConfigError(
            f"kmeans.n_clusters[0]={k1} is larger than the {points} {where}: level 1 cannot "
            f"have more clusters than points; lower kmeans.n_clusters[0] to at most {points}"
        )
    specs = []
    for level in range(1, params.n_levels + 1):
        h = config_digest("kmeans", params.level_json(level), upstream)
        specs.append(
            StageSpec(
                level_stage(level),
                "kmeans",
                "jobs.kmeans",
                f"kmeans/level{level}",
                DISTRIBUTED,
                1,
                h,
                world_size=world,
                depends_on=deps,
            )
        )
        deps, upstream = (level_stage(level),), h
    return specs


def _curate(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    sampling = sampling_params(cfg)
    levels = sorted(level_of(name) for name in prior if name.startswith(LEVEL_PREFIX))
    if not levels:
        raise ConfigError(
            "stages: curate samples from the k-means hierarchy; put kmeans before curate in "
            "`stages`"
        )
    top = prior[level_stage(levels[-1])]
    if (
        rows
        and sampling.target_size > rows * sampling.multiplier
        and not cfg.kmeans.embeddings_path
    ):
        raise ConfigError(
            f"curate.target_size={sampling.target_size} is more than the {rows} rows in the "
            f"dataset (x curate.multiplier {sampling.multiplier}); lower curate.target_size or "
            "raise curate.multiplier"
        )
    section = to_plain(cfg.curate)
    h = config_digest("curate", section, len(levels), top.config_hash)
    return [
        StageSpec(
            CURATE_STAGE,
            "curate",
            "jobs.curate",
            "kmeans/curated",
            SINGLE,
            1,
            h,
            depends_on=(top.name,),
        )
    ]


register_stage("kmeans", _kmeans)
register_stage(CURATE_STAGE, _curate)


def curation_summary(run_dir: Path, stage_names: list[str]) -> list[str]:
    """Summary lines of a finished curation run: per level clusters and inertia, the
    curated rows and where the files are. Empty when the plan has no k-means stage."""
    import json

    from lib.hierarchical_kmeans import read_final

    lines = []
    levels = sorted(level_of(n) for n in stage_names if n.startswith(LEVEL_PREFIX))
    for level in levels:
        final = read_final(run_dir, level)
        if final is None:
            continue
        lines.append(
            f"  k-means L{level}    {final['n_points']} points -> {final['n_clusters']} clusters, "
            f"inertia {final['inertia']:.6g} ({run_dir / 'kmeans' / f'level{level}' / final['step']})"
        )
    marker = Path(run_dir) / "kmeans" / "curated" / "completions" / "task_00000.json"
    if CURATE_STAGE in stage_names and marker.exists():
        counts = json.loads(marker.read_text())["counts"]
        cur = Path(run_dir) / "kmeans" / "curated"
        lines.append(
            f"  curated        {counts['rows']} rows ({counts['unique_rows']} distinct): "
            f"{cur / 'embedding_rows.npy'}"
        )
        if (cur / "metadata.parquet").exists():
            lines.append(f"  curated meta   {cur / 'metadata.parquet'} (+ dataset_rows.npy)")
    return lines
