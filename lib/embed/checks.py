"""Checks of the embed stage run at launch, before anything is written.

``check_max_length``: ``model.max_length`` against the model's own position limit (a
longer row would end in a tensor-size traceback inside a task).

``check_input_unchanged``: the dataset's fingerprint against the one recorded in the run
dir's ``plan.json`` when its embed tasks finished, so that a file changed in place is an
error naming it, not "already complete" with the old embeddings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from omegaconf import DictConfig

from lib.core.errors import ConfigError, DatasetError
from lib.core.paths import RunPaths
from lib.data.fingerprint import Fingerprint, fingerprint_changes
from lib.embed.plan import input_fingerprint
from lib.plan.spec import Plan

# Where Plan.extra keeps the fingerprint the embed stage was planned with.
FINGERPRINT_KEY = "input_fingerprint"

# Tokenizers without a limit of their own report int(1e30) as model_max_length.
_NO_LIMIT = 10**9
# Models whose position ids start after the padding index (fairseq's layout): of
# max_position_embeddings, pad_token_id + 1 positions are never used by a token.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "bart"}


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def position_limit(model_dir: Path) -> tuple[int, str] | None:
    """The most tokens a row may have for the model in ``model_dir``, and where that limit
    comes from; None when its config states none (rotary models without a maximum)."""
    limits: list[tuple[int, str]] = []
    config = _json(model_dir / "config.json")
    for cfg in (config, config.get("text_config") or {}):
        n = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
        if isinstance(n, int) and n > 0:
            if config.get("model_type") in _OFFSET_POSITIONS:
                n -= int(config.get("pad_token_id") or 0) + 1
            limits.append((n, f"max_position_embeddings in {model_dir / 'config.json'}"))
            break
    n = _json(model_dir / "tokenizer_config.json").get("model_max_length")
    if isinstance(n, int | float) and 0 < n < _NO_LIMIT:
        limits.append((int(n), f"model_max_length in {model_dir / 'tokenizer_config.json'}"))
    return min(limits) if limits else None


def check_max_length(model: DictConfig, model_dir: Path) -> None:
    """Raise ``ConfigError`` when ``model.max_length`` exceeds the model's position limit
    (``position_limit``), naming the limit and where it comes from."""
    limit = position_limit(Path(model_dir))
    if limit is None:
        return
    n, where = limit
    if int(model.max_length) > n:
        raise ConfigError(
            f"model.max_length={model.max_length} is more than model {model.name} can take: "
            f"at most {n} tokens ({where}). Set model.max_length to at most {n}; longer rows "
            "are dropped and recorded, never truncated."
        )


def _has_task_markers(paths: RunPaths, stage_dir: str) -> bool:
    pattern = re.compile(rf"{re.escape(stage_dir)}/completions/task_\d+\.json")
    return any(pattern.fullmatch(name) for name in paths.storage.list(stage_dir))


def check_input_unchanged(
    cfg: DictConfig, paths: RunPaths, plan: Plan, *, force: bool = False
) -> Fingerprint:
    """The dataset's fingerprint, for ``plan.extra``. Raises ``DatasetError`` naming each
    changed file and the fix when the run dir already holds embed shards of another input
    (``force``: accept the new input; its stages are then redone)."""
    new = input_fingerprint(cfg)
    embed = plan.group("embed")
    if force or not embed or any("unavailable" in v for v in new.values()):
        return new
    try:
        saved = Plan.load(paths)
    except (ConfigError, ValueError, KeyError, TypeError):
        return new  # a new run dir (or one without a readable plan): nothing to compare
    old_embed = saved.group("embed")
    if not old_embed or not _has_task_markers(paths, old_embed[0].stage_dir):
        return new  # nothing embedded yet: the new input is simply used
    old = saved.extra.get(FINGERPRINT_KEY)
    fix = (
        "Its embeddings are of the old data. Use a new run name (run.name=...) to embed the "
        "input as it is now beside the old run, or relaunch with --force-replan to accept it "
        "here (embed and every stage after it are redone)."
    )
    if old is None:
        raise DatasetError(
            f"{paths.root} was planned before embedfleet recorded input fingerprints, so it "
            f"cannot tell whether {cfg.dataset.path} changed since its shards were embedded. " + fix
        )
    changes = fingerprint_changes(old, new)
    if changes:
        raise DatasetError(
            f"the input of {paths.root} changed since its embed shards were written:\n  "
            + "\n  ".join(changes)
            + "\n"
            + fix
        )
    return new


def check_input_at_task(cfg: DictConfig, recorded: Fingerprint | None) -> None:
    """Raise ``DatasetError`` when the dataset a task is about to read is not the one its
    run was planned with (changed after launch, or before a ``retry``): shards of two
    versions of the data must never be merged."""
    if not recorded or any("unavailable" in v for v in recorded.values()):
        return
    changes = fingerprint_changes(recorded, input_fingerprint(cfg))
    if changes:
        raise DatasetError(
            "the input changed since this run was launched:\n  "
            + "\n  ".join(changes)
            + "\nRelaunch with a new run name (run.name=...), or with --force-replan to "
            "re-embed this run dir from the input as it is now."
        )
