"""What the metrics stage says in the end-of-run summary about its outputs."""

from __future__ import annotations

from lib.core.paths import METRICS_FILES, METRICS_LEVEL_PREFIX, RunPaths, level_of
from lib.plan.spec import StageSpec


def summary(paths: RunPaths, specs: list[StageSpec]) -> list[str]:
    """Per measured level: silhouette, Davies-Bouldin and where the files are."""
    lines = []
    for spec in specs:
        level = level_of(spec.name, METRICS_LEVEL_PREFIX)
        doc = paths.storage.read_json(paths.metrics_file(level, METRICS_FILES[0]))
        if doc is None:
            continue
        lines.append(
            f"  metrics L{doc['level']}     silhouette {doc.get('silhouette', float('nan')):.4f}, "
            f"Davies-Bouldin {doc['davies_bouldin']:.4f} ({paths.url(spec.stage_dir)})"
        )
    return lines
