"""The extract stage in a plan: one array task per contiguous slice of samples, then one
task (``extract_metadata``) that merges the tasks' metadata into ``extract/metadata.json``.

Its config hash covers the dataset, the hashed ``extract.*`` values, the row count and the
input's fingerprint: a dataset changed in place makes a relaunch see another
configuration."""

from __future__ import annotations

from omegaconf import DictConfig

from lib.config.fields import hashed_values, to_params, to_plain
from lib.core.errors import ConfigError, DatasetError
from lib.core.hashing import config_digest
from lib.core.paths import (
    EXTRACT_DIR,
    EXTRACT_MERGED_DIR,
    EXTRACT_METADATA_STAGE,
    EXTRACT_STAGE,
)
from lib.data.fingerprint import dataset_fingerprint
from lib.extract.params import ExtractParams, Packing
from lib.plan.spec import ARRAY, SINGLE, StageSpec


def extract_params(cfg: DictConfig) -> ExtractParams:
    return to_params(cfg.extract, ExtractParams)


def planned_rows(cfg: DictConfig, rows: int) -> int:
    """Dataset rows the tasks read: in truncate mode at most ``extract.max_samples``; in
    pack mode all (``max_samples`` then caps the contexts)."""
    limit = cfg.extract.max_samples
    if limit is not None and Packing(cfg.extract.packing) == Packing.truncate:
        return min(rows, int(limit))
    return rows


def _fingerprint(cfg: DictConfig):
    try:
        return dataset_fingerprint(cfg)
    except (DatasetError, OSError) as exc:
        return {str(cfg.dataset.path): {"unavailable": str(exc)}}


def build(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    n = int(cfg.extract.num_tasks)
    total = planned_rows(cfg, rows)
    if n > total:
        raise ConfigError(
            f"extract.num_tasks={n} is more than the {total} rows to extract; use at most {total}"
        )
    h = config_digest(
        EXTRACT_STAGE,
        to_plain(cfg.dataset),
        hashed_values(ExtractParams, cfg.extract),
        total,
        _fingerprint(cfg),
    )
    extract = StageSpec(EXTRACT_STAGE, EXTRACT_STAGE, "jobs.extract", EXTRACT_DIR, ARRAY, n, h)
    merged = StageSpec(
        EXTRACT_METADATA_STAGE,
        EXTRACT_STAGE,
        "jobs.extract",
        EXTRACT_MERGED_DIR,
        SINGLE,
        1,
        config_digest(EXTRACT_METADATA_STAGE, h),
        depends_on=(EXTRACT_STAGE,),
    )
    return [extract, merged]
