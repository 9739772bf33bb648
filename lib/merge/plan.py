"""The merge stage in a plan: one task after the embed stage (and after the sync stage when
the plan has one: it merges what the sync downloads), and its end-of-run summary."""

from __future__ import annotations

from omegaconf import DictConfig

from lib.config.fields import hashed_values
from lib.core.hashing import config_digest
from lib.core.paths import EMBED_STAGE, MERGE_DIR, MERGE_STAGE, SYNC_STAGE
from lib.merge.params import MergeParams
from lib.plan.spec import SINGLE, StageSpec


def build(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    """The merge stage: depends on the planned embed and sync stages; its hash covers its
    own settings and theirs (a plan without sync hashes as before sync existed)."""
    embed, sync = prior.get(EMBED_STAGE), prior.get(SYNC_STAGE)
    deps = tuple(s.name for s in (embed, sync) if s is not None)
    values = hashed_values(MergeParams, cfg.merge)
    if values.get("metadata_path") is None:
        values.pop("metadata_path", None)  # unset: the hash of run dirs made before it existed
    parts = ["merge", values, embed.config_hash if embed else "no-embed"]
    if sync is not None:
        parts.append({"sync": sync.config_hash})
    h = config_digest(*parts)
    return [StageSpec(MERGE_STAGE, "merge", "jobs.merge", MERGE_DIR, SINGLE, 1, h, depends_on=deps)]
