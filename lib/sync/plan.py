"""The sync stage in a plan: one task per source, first in the pipeline (it reads no
stage), and what a launch does before it runs (``before_launch``)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from lib.config.fields import to_params
from lib.core.errors import ConfigError
from lib.core.hashing import config_digest
from lib.core.markers import discard_marker
from lib.core.paths import SYNC_DIR, SYNC_STAGE, RunPaths
from lib.plan.spec import ARRAY, StageSpec
from lib.sync.params import SyncParams, parse_sources


def feeds_merge(cfg: DictConfig) -> bool:
    """Whether the merge of ``cfg`` reads what this sync downloads: ``merge.input=legacy|
    synced``, ``sync.sources`` names hosts, and no ``merge.legacy_dir`` points elsewhere.
    Then ``stages=[merge]`` plans sync as its upstream (the merge hashes as under
    ``stages=[sync,merge]``), and a sync that changes those files sets the merge aside."""
    kind = str(OmegaConf.select(cfg, "merge.input", default="embed"))
    if kind not in ("legacy", "synced"):
        return False
    if kind == "legacy" and OmegaConf.select(cfg, "merge.legacy_dir", default=None):
        return False
    return bool(OmegaConf.select(cfg, "sync.sources", default=None))


def sync_params(cfg: DictConfig) -> SyncParams:
    return to_params(cfg.sync, SyncParams)


def build(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    """One array task per source of ``sync.sources`` (sorted by name). Raises
    ``ConfigError`` when there is none or a source is invalid."""
    params = sync_params(cfg)
    sources = parse_sources(params.sources)
    if not sources:
        raise ConfigError(
            "stages include sync, but sync.sources is empty: describe the hosts to pull from "
            "in conf/sync/NAME.yaml and pick it with sync=NAME (see conf/sync/"
            "example_two_clusters.yaml), or set sync.sources in the experiment"
        )
    h = config_digest("sync", [s.identity() for s in sources], params.dest)
    return [StageSpec(SYNC_STAGE, "sync", "jobs.sync", SYNC_DIR, ARRAY, len(sources), h)]


def before_launch(paths: RunPaths, specs: list[StageSpec]) -> list[str]:
    """A launch that runs sync looks at the hosts again: each source's marker is set
    aside so its task runs. Its record (``RunPaths.sync_record``) stays: verified files
    whose remote size and mtime are unchanged are not downloaded again. Returns what to
    print."""
    lines = []
    for spec in specs:
        present = [
            t
            for t in range(spec.num_tasks)
            if paths.storage.exists(paths.marker(spec.stage_dir, t))
        ]
        for t in present:
            discard_marker(paths.storage, paths.marker(spec.stage_dir, t))
        if present:
            lines.append(
                f"{spec.name}: checking the {len(present)} synced source(s) against their "
                "hosts again (verified, unchanged files are not downloaded again)"
            )
    return lines
