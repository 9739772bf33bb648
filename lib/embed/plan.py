"""The embed stage in a plan: one array task per shard of contiguous rows."""

from __future__ import annotations

from omegaconf import DictConfig

from lib.config.fields import hashed_values, to_plain
from lib.core.errors import ConfigError
from lib.core.hashing import config_digest
from lib.core.paths import EMBED_DIR, EMBED_STAGE
from lib.embed.params import EmbedParams
from lib.plan.spec import ARRAY, StageSpec


def build(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    n = int(cfg.embed.num_shards)
    if n < 1:
        raise ConfigError(f"embed.num_shards must be >= 1, got {n}")
    if n > rows:
        raise ConfigError(
            f"embed.num_shards={n} is more than the {rows} rows to embed; use at most {rows}"
        )
    h = config_digest(
        "embed",
        to_plain(cfg.dataset),
        to_plain(cfg.model),
        hashed_values(EmbedParams, cfg.embed),
        rows,
    )
    return [StageSpec(EMBED_STAGE, "embed", "jobs.embed", EMBED_DIR, ARRAY, n, h)]
