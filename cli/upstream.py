"""A launch whose first stage reads another stage's outputs (``stages=[merge]``).

The stages before it are planned too (so the plan names the outputs it reads, and their
hashes chain as in a full run), but they must already be complete in the run dir: a
launch refuses, before anything is written, when one of them has a task without a valid
marker, naming the stage and the ``stages=[...]`` that computes it. A merge that reads
files of its own (``merge.input=legacy|synced``, ``merge.metadata_path``) is refused the
same way when they are not there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from lib.core.errors import UpstreamIncompleteError
from lib.core.paths import RunPaths
from lib.core.sharding import compress_indices
from lib.plan.spec import Plan, completed_tasks
from lib.sync.plan import feeds_merge

if TYPE_CHECKING:
    from lib.merge.sources import SourceDir


def reads(cfg: DictConfig, stage: str) -> str | None:
    """The stage whose outputs ``stage`` reads under ``cfg``; None when it reads an input
    of its own (``merge.input=legacy``, ``kmeans.embeddings_path``) or nothing."""
    if stage == "merge":
        if str(cfg.merge.input) == "embed":
            return "embed"
        return "sync" if feeds_merge(cfg) else None
    if stage == "kmeans":
        return None if cfg.kmeans.embeddings_path else "merge"
    if stage in ("curate", "metrics"):
        return "kmeans"
    if stage == "index":
        return "merge"
    return None


def upstream_stages(cfg: DictConfig) -> list[str]:
    """The stages, in order, that ``cfg.stages``' first stage reads and ``cfg.stages``
    does not run (``[embed]`` for ``stages=[merge]``; ``[]`` for a full pipeline)."""
    stages = [str(s) for s in cfg.stages]
    added: list[str] = []
    while stages and (up := reads(cfg, stages[0])) is not None and up not in stages:
        stages.insert(0, up)
        added.insert(0, up)
    return added


def check_upstream_complete(
    paths: RunPaths, plan: Plan, added: list[str], requested: list[str]
) -> None:
    """Raise ``UpstreamIncompleteError`` when a stage of the groups ``added`` (planned only
    as inputs of ``requested``) has a task without a valid marker in ``paths``."""
    for spec in plan.stages:
        if spec.group not in added:
            continue
        missing = sorted(set(range(spec.num_tasks)) - completed_tasks(paths, spec))
        if missing:
            full = ",".join([*added, *requested])
            raise UpstreamIncompleteError(
                f"stages=[{','.join(requested)}]: {requested[0]} reads the outputs of stage "
                f"{spec.name!r}, but {len(missing)} of its {spec.num_tasks} task(s) have no "
                f"completion marker in {paths.root} (tasks {compress_indices(missing)}). "
                f"Compute them first: launch with stages=[{full}] (tasks already complete "
                "are skipped); run.yaml and plan.json are left as they were."
            )


def _has_inputs(src: SourceDir, kind: str) -> bool:
    from lib.merge.sources import LEGACY_GLOB
    from lib.merge.synced import SYNCED_MARKER

    if kind == "legacy":
        return bool(src.matching(LEGACY_GLOB))
    return any(SYNCED_MARKER.fullmatch(n) for n in src.files)


def check_merge_inputs(cfg: DictConfig, paths: RunPaths, requested: list[str]) -> None:
    """Refuse, before anything is written, a merge whose own input files are missing:
    ``merge.metadata_path`` (whenever the merge is planned) and, when the merge is the
    first stage (nothing planned downloads them), the legacy pickles or synced embed
    shards of ``merge.input=legacy|synced``. Raises ``UpstreamIncompleteError`` naming
    the directory and the fix (``ShardValidationError`` for a bad metadata path)."""
    if "merge" not in requested:
        return
    from lib.merge.row_metadata import MetadataFile
    from lib.merge.sources import LEGACY_GLOB, legacy_dir_source, sync_root_url, sync_sources

    if cfg.merge.metadata_path:
        MetadataFile(str(cfg.merge.metadata_path), bool(cfg.merge.allow_pickle))
    kind = str(cfg.merge.input)
    if requested[0] != "merge" or kind not in ("legacy", "synced"):
        return
    what = f"{LEGACY_GLOB} files" if kind == "legacy" else "embed shards with their markers"
    left = "run.yaml and plan.json are left as they were"
    if kind == "legacy" and cfg.merge.legacy_dir:
        src = legacy_dir_source(str(cfg.merge.legacy_dir))
        if not _has_inputs(src, kind):
            raise UpstreamIncompleteError(
                f"merge.input=legacy reads the {what} of merge.legacy_dir={src.url}, and "
                f"there is none there: point merge.legacy_dir at the directory of the seed "
                f"runs' pickles; {left}"
            )
        return
    dest = OmegaConf.select(cfg, "sync.dest", default=None)
    sources = sync_sources(paths, dest)
    if not any(_has_inputs(s, kind) for s in sources):
        root = sync_root_url(paths, dest)
        seen = f" (source dirs there: {', '.join(s.name or s.url for s in sources)})"
        alt = "set merge.legacy_dir=/path/to/pickles, or " if kind == "legacy" else ""
        raise UpstreamIncompleteError(
            f"stages=[{','.join(requested)}]: merge.input={kind} reads {what} synced into "
            f"{root}/<source>/, and there are none{seen if sources else ''}: {alt}sync them "
            f"first with stages=[sync,{','.join(requested)}] and sync.sources naming the "
            f"hosts; {left}"
        )
