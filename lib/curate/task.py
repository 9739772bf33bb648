"""What the curate job runs: balanced hierarchical sampling of ``curate.target_size`` rows
from the finished k-means hierarchy (``lib.curate.sampling.write_curated``)."""

from __future__ import annotations

import logging

from lib.core.paths import is_level_stage, level_of
from lib.curate.plan import curate_params, metadata_source
from lib.curate.sampling import write_curated
from lib.runtime.context import TaskContext

log = logging.getLogger(__name__)


def run(ctx: TaskContext) -> None:
    levels = max(level_of(s.name) for s in ctx.plan.stages if is_level_stage(s.name))
    rows = write_curated(
        ctx.paths,
        levels,
        curate_params(ctx.cfg),
        metadata=metadata_source(ctx.cfg, ctx.paths),
        config_hash=ctx.spec.config_hash,
        stage=ctx.spec.name,
    )
    log.info("curated %d rows (%d distinct) from %d levels", len(rows), len(set(rows)), levels)
