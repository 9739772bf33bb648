"""The index stage in a plan: one task after merge, its hash chained to the merge's."""

from __future__ import annotations

from omegaconf import DictConfig

from lib.config.fields import hashed_values, to_params
from lib.core.errors import ConfigError
from lib.core.hashing import config_digest
from lib.core.paths import INDEX_DIR, INDEX_STAGE, MERGE_STAGE
from lib.index.params import IndexParams
from lib.plan.spec import SINGLE, StageSpec


def index_params(cfg: DictConfig) -> IndexParams:
    return to_params(cfg.index, IndexParams)


def build(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    merge = prior.get(MERGE_STAGE)
    if merge is None:
        raise ConfigError(
            "stages: index reads the merged embeddings; put merge before index in `stages` "
            "(e.g. stages=[embed,merge,index])"
        )
    h = config_digest(INDEX_STAGE, hashed_values(IndexParams, cfg.index), merge.config_hash)
    return [
        StageSpec(
            INDEX_STAGE,
            INDEX_STAGE,
            "jobs.index",
            INDEX_DIR,
            SINGLE,
            1,
            h,
            depends_on=(merge.name,),
        )
    ]
