"""What the merge stage says in the end-of-run summary about its outputs."""

from __future__ import annotations

from lib.core.paths import RunPaths
from lib.plan.spec import StageSpec


def summary(paths: RunPaths, specs: list[StageSpec]) -> list[str]:
    """The merged files, the dropped rows and the L2 norms of a finished merge."""
    r = paths.storage.read_json(paths.merge_report)
    if r is None:
        return []
    n = r["l2_norm"]
    first = paths.merge_embeddings("npy" if r["files"][0].endswith(".npy") else "safetensors")
    lines = [
        f"  embeddings     {paths.url(first)}  ({r['shape'][0]} x {r['shape'][1]} {r['dtype']})",
        f"  metadata       {paths.url(paths.merge_metadata)}",
        f"  dropped rows   {r.get('rows_dropped', 0)}  ({paths.url(paths.merge_dropped)})",
    ]
    if r.get("duplicate_ids"):
        first = next(iter(r.get("duplicate_id_examples") or {}), "?")
        lines.append(
            f"  duplicate ids  {r['duplicate_ids']} row(s) repeat an earlier id (first: "
            f"{first!r}); dataset.unique_ids=true makes this an error"
        )
    if "by_source" in r:
        lines.append(
            f"  by source      {len(r['by_source'])} sources under "
            f"{paths.url(paths.merge_by_source)}"
        )
    lines += [
        f"  L2 norms       min {n['min']:.4f}  max {n['max']:.4f}  mean {n['mean']:.4f}  "
        f"std {n['std']:.2e}",
        f"  quality report {paths.url(paths.merge_report)}",
    ]
    return lines
