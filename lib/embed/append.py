"""``embed.append=true``: a run whose dataset grew embeds only the new rows.

The run's existing shards keep their row ranges, files and markers; the new rows
(``old_rows..new_rows``) become new shards after them, of about the existing shards' size.
Their markers carry the embed hash the run was first planned with (its *basis*: the row
count and input fingerprint of that launch, kept in ``plan.json``), so the old markers
stay valid and ``Plan.extra['embed_ranges']`` gives every task its range. The stages
after embed get new hashes (their input grew) and are redone.

What this mode checks: the configuration is the one the run embedded with (model, text
mode, every hashed dataset/model/embed key) and the dataset has at least as many rows.
What it cannot check: rows changed in place before the old row count (their embeddings
are the old ones); for that, launch a new run.
"""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf

from lib.config.fields import to_plain
from lib.core.errors import ConfigError, ConfigMismatchError, DatasetError
from lib.core.paths import RunPaths
from lib.core.sharding import all_ranges
from lib.embed.plan import embed_hash
from lib.plan.spec import Plan

BASIS_KEY = "embed_basis"  # {"rows", "fingerprint"}: what the embed hash was computed from
RANGES_KEY = "embed_ranges"


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out: dict = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def _changed_keys(cfg: DictConfig, paths: RunPaths) -> list[str]:
    """dataset/model/embed keys that differ from the run's saved ``run.yaml``."""
    try:
        text = paths.storage.read_text(paths.run_config)
    except FileNotFoundError:
        return []
    old = _flat(OmegaConf.to_container(OmegaConf.create(text), resolve=False))
    new = _flat(to_plain(cfg))
    keys = sorted(
        k
        for k in set(old) | set(new)
        if k.startswith(("dataset.", "model.", "embed.")) and k != "embed.append"
    )
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def new_shard_count(old_rows: int, old_shards: int, new_rows: int) -> int:
    """Shards for ``new_rows`` appended rows: about the existing shards' size."""
    per_shard = max(1, old_rows // max(1, old_shards))
    return max(1, min(new_rows, round(new_rows / per_shard)))


def apply_append(cfg: DictConfig, paths: RunPaths, plan: Plan, rows: int) -> bool:
    """Turn ``plan``'s embed stage into the existing shards plus new ones for the rows
    added since the run dir's last launch. Returns whether rows were added (the later
    stages' markers are then of the smaller dataset). A run dir that embedded nothing
    yet is left as planned. Raises ``DatasetError`` when the dataset shrank,
    ``ConfigMismatchError`` when anything else that the embeddings depend on changed."""
    embed = plan.group("embed")
    if not embed:
        return False
    try:
        saved = Plan.load(paths)
    except (ConfigError, ValueError, KeyError, TypeError):
        return False  # a new run dir: a plain first embedding
    old_specs = saved.group("embed")
    if not old_specs:
        return False
    old, spec = old_specs[0], embed[0]
    old_rows = int(saved.dataset_rows)
    from lib.embed.checks import FINGERPRINT_KEY

    basis = saved.extra.get(BASIS_KEY) or {
        "rows": old_rows,
        "fingerprint": saved.extra.get(FINGERPRINT_KEY),
    }
    if basis["fingerprint"] is None:
        raise DatasetError(
            f"{paths.root} was planned before embedfleet recorded input fingerprints: "
            "embed.append cannot tell what it embedded. Launch a new run (run.name=...)."
        )
    if rows < old_rows:
        raise DatasetError(
            f"embed.append: {cfg.dataset.path} now has {rows} rows to embed, fewer than the "
            f"{old_rows} this run embedded: rows were removed, so its shards no longer match "
            "the dataset. Append only adds rows; launch a new run (run.name=...) for the "
            "dataset as it is now."
        )
    h0 = embed_hash(cfg, int(basis["rows"]), basis["fingerprint"])
    if h0 != old.config_hash:
        changes = _changed_keys(cfg, paths)
        detail = "\n  ".join(changes) if changes else "(no key of run.yaml differs)"
        raise ConfigMismatchError(
            "embed.append: the embed configuration changed since this run embedded its "
            f"shards, so new rows would not be embedded like the old ones:\n  {detail}\n"
            "Append only adds rows of the same dataset with the same model and text "
            "settings; launch a new run (run.name=...) for another configuration."
        )
    ranges = [list(r) for r in saved.extra.get(RANGES_KEY) or all_ranges(old_rows, old.num_tasks)]
    if rows > old_rows:
        added = rows - old_rows
        n = new_shard_count(old_rows, len(ranges), added)
        ranges += [[old_rows + a, old_rows + b] for a, b in all_ranges(added, n)]
    i = plan.stages.index(spec)
    plan.stages[i] = dataclasses.replace(spec, num_tasks=len(ranges), config_hash=h0)
    plan.extra[RANGES_KEY] = ranges
    plan.extra[BASIS_KEY] = basis
    # The later stages' hashes chain on the input as it is now: new ones when it grew.
    return rows > old_rows


def appends(cfg: DictConfig, paths: RunPaths) -> bool:
    """Whether this launch plans the embed stage in append mode: ``embed.append=true``,
    or a run dir that an earlier launch appended to (its shards keep their ranges)."""
    if bool(cfg.embed.get("append", False)):
        return True
    try:
        return BASIS_KEY in Plan.load(paths).extra
    except (ConfigError, ValueError, KeyError, TypeError):
        return False
