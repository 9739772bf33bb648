"""What a ``metrics_level{L}`` job runs: the metrics of one k-means level of the run."""

from __future__ import annotations

from lib.compute.distributed import process_group
from lib.core.paths import METRICS_DIR, METRICS_LEVEL_PREFIX, level_of
from lib.metrics.levels import ClusteringInputs, MetricsOutput
from lib.metrics.measure import measure, merged_embeddings, merged_metadata, print_summary
from lib.runtime.context import TaskContext


def run(ctx: TaskContext) -> None:
    level = level_of(ctx.spec.name, METRICS_LEVEL_PREFIX)
    paths = ctx.paths
    inputs = ClusteringInputs(
        name=str(ctx.cfg.run.name),
        run=paths,
        embeddings=merged_embeddings(paths),
        metadata=merged_metadata(paths),
        text_field=str(ctx.cfg.clustering.text_field),
    )
    with process_group():
        reports = measure(
            ctx.cfg,
            inputs,
            [level],
            MetricsOutput(paths.storage, METRICS_DIR),
            {level: ctx.spec.config_hash},
            {level: ctx.spec.name},
        )
    if reports:
        print_summary(reports)
