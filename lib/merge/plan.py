"""The merge stage in a plan: one task after the embed stage, and its end-of-run summary."""

from __future__ import annotations

from omegaconf import DictConfig

from lib.config.fields import hashed_values
from lib.core.hashing import config_digest
from lib.core.paths import MERGE_DIR, MERGE_STAGE
from lib.merge.params import MergeParams
from lib.plan.spec import SINGLE, StageSpec


def build(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    upstream = prior.get("embed")
    deps = ("embed",) if upstream else ()
    h = config_digest(
        "merge",
        hashed_values(MergeParams, cfg.merge),
        upstream.config_hash if upstream else "no-embed",
    )
    return [StageSpec(MERGE_STAGE, "merge", "jobs.merge", MERGE_DIR, SINGLE, 1, h, depends_on=deps)]
