"""What the curate stage says in the end-of-run summary about its outputs."""

from __future__ import annotations

from lib.core.paths import RunPaths
from lib.plan.spec import StageSpec


def summary(paths: RunPaths, specs: list[StageSpec]) -> list[str]:
    """How many rows were curated, and where they are."""
    blob = paths.storage.read_json(paths.marker(paths.curated, 0))
    if blob is None:
        return []
    counts = blob["counts"]
    lines = [
        f"  curated        {counts['rows']} rows ({counts['unique_rows']} distinct): "
        f"{paths.url(paths.curated_file('embedding_rows.npy'))}"
    ]
    if paths.storage.exists(paths.curated_file("metadata.parquet")):
        lines.append(
            f"  curated meta   {paths.url(paths.curated_file('metadata.parquet'))} "
            "(+ dataset_rows.npy)"
        )
    return lines
