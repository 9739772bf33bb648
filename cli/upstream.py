"""A launch whose first stage reads another stage's outputs (``stages=[merge]``).

The stages before it are planned too (so the plan names the outputs it reads, and their
hashes chain as in a full run), but they must already be complete in the run dir: a
launch refuses, before anything is written, when one of them has a task without a valid
marker, naming the stage and the ``stages=[...]`` that computes it.
"""

from __future__ import annotations

from omegaconf import DictConfig

from lib.core.errors import UpstreamIncompleteError
from lib.core.paths import RunPaths
from lib.core.sharding import compress_indices
from lib.plan.spec import Plan, completed_tasks


def reads(cfg: DictConfig, stage: str) -> str | None:
    """The stage whose outputs ``stage`` reads under ``cfg``; None when it reads an input
    of its own (``merge.input=legacy``, ``kmeans.embeddings_path``) or nothing."""
    if stage == "merge":
        return "embed" if str(cfg.merge.input) == "embed" else None
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
