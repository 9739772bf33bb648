"""The embed stage in a plan: one array task per shard of contiguous rows.

Its config hash covers the dataset, model and embed settings, the row count and the
input's fingerprint (``lib.data.fingerprint``): a dataset changed in place under the same
path makes the relaunch see another configuration (``lib.embed.checks`` names the file)."""

from __future__ import annotations

from omegaconf import DictConfig

from lib.config.fields import hashed_values, to_plain
from lib.core.errors import ConfigError, DatasetError
from lib.core.hashing import config_digest
from lib.core.paths import EMBED_DIR, EMBED_STAGE
from lib.data.fingerprint import Fingerprint, dataset_fingerprint
from lib.embed.params import EmbedParams, ModelParams
from lib.plan.spec import ARRAY, StageSpec


def input_fingerprint(cfg: DictConfig) -> Fingerprint:
    """The dataset's fingerprint; where the dataset cannot be reached (a dry run planned
    from ``dataset.expected_rows``), a placeholder that says so."""
    try:
        return dataset_fingerprint(cfg)
    except (DatasetError, OSError) as exc:
        return {str(cfg.dataset.path): {"unavailable": str(exc)}}


# dataset keys added after run dirs existed: left out of the hash at these values, so a
# run dir planned before them keeps its hash.
_NEWER_DATASET_DEFAULTS = {
    "per_source": None,
    "sampling": "first",
    "seed": 0,
    "sources": [],
    "keep_text": True,
    "streaming": False,
}


def embed_hash(cfg: DictConfig, rows: int, fingerprint: Fingerprint) -> str:
    """The embed stage's config hash for ``rows`` rows of the input ``fingerprint``."""
    dataset = to_plain(cfg.dataset)
    if dataset.get("per_source") is None:
        # sampling and seed mean nothing without per_source
        dataset.pop("sampling", None)
        dataset.pop("seed", None)
    for key, default in _NEWER_DATASET_DEFAULTS.items():
        if key in dataset and dataset[key] == default:
            dataset.pop(key)
    return config_digest(
        "embed",
        dataset,
        hashed_values(ModelParams, cfg.model),  # less query_prompt: queries only
        hashed_values(EmbedParams, cfg.embed),
        rows,
        fingerprint,
    )


def build(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    n = int(cfg.embed.num_shards)
    if n < 1:
        raise ConfigError(f"embed.num_shards must be >= 1, got {n}")
    if n > rows:
        raise ConfigError(
            f"embed.num_shards={n} is more than the {rows} rows to embed; use at most {rows}"
        )
    h = embed_hash(cfg, rows, input_fingerprint(cfg))
    return [StageSpec(EMBED_STAGE, "embed", "jobs.embed", EMBED_DIR, ARRAY, n, h)]
