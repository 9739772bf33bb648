"""What the kmeans stage says in the end-of-run summary about its outputs."""

from __future__ import annotations

from lib.core.paths import RunPaths, is_level_stage, level_of
from lib.plan.spec import StageSpec


def summary(paths: RunPaths, specs: list[StageSpec]) -> list[str]:
    """Per finished level: points, clusters, inertia and where its final step is."""
    lines = []
    for spec in specs:
        if not is_level_stage(spec.name):
            continue
        level = level_of(spec.name)
        final = paths.storage.read_json(paths.kmeans_final(level))
        if final is None:
            continue
        step = paths.kmeans_step(level, final["step"]).dir
        lines.append(
            f"  k-means L{level}    {final['n_points']} points -> {final['n_clusters']} clusters, "
            f"inertia {final['inertia']:.6g} ({paths.url(step)})"
        )
    return lines
