"""Curate stage: balanced hierarchical sampling of ``curate.target_size`` rows from the
finished k-means hierarchy (``lib.hierarchical_sampling.write_curated``).

Writes ``kmeans/curated/``: ``embedding_rows.npy`` (rows of the clustered matrix),
``dataset_rows.npy`` and ``metadata.parquet`` (id, source, original row index, embedding
row) when the rows have metadata (the merge stage's ``metadata.parquet``).
"""

from __future__ import annotations

import sys

from jobs._common import JobContext, log, run_job
from lib.hierarchical_sampling import write_curated
from lib.kmeans_stages import LEVEL_PREFIX, level_of, metadata_source, sampling_params


def body(ctx: JobContext) -> None:
    levels = [level_of(s.name) for s in ctx.plan.stages if s.name.startswith(LEVEL_PREFIX)]
    rows = write_curated(
        ctx.run_dir,
        max(levels),
        sampling_params(ctx.cfg),
        metadata_path=metadata_source(ctx.cfg, ctx.run_dir),
        config_hash=ctx.spec.config_hash,
        stage_hash=ctx.spec.config_hash,
    )
    log.info("curated %d rows (%d distinct) from %d levels", len(rows), len(set(rows)), max(levels))


def main(argv: list[str] | None = None) -> int:
    return run_job("curate", body, argv)


if __name__ == "__main__":
    sys.exit(main())
