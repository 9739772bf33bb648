"""What the index stage says in the end-of-run summary."""

from __future__ import annotations

import shlex

from lib.core.paths import INDEX_DIR, RunPaths
from lib.plan.spec import StageSpec


def summary(paths: RunPaths, specs: list[StageSpec]) -> list[str]:
    """The index's kind, metric and size, where it is, and the search command."""
    blob = paths.storage.read_json(paths.marker(INDEX_DIR, 0))
    if blob is None:
        return []
    layout = (blob.get("extra") or {}).get("layout", {})
    kind = layout.get("kind", "?")
    tuning = ""
    if layout.get("nlist"):
        tuning = f", nlist {layout['nlist']}, nprobe {layout.get('nprobe')}"
    elif kind == "hnsw":
        tuning = f", M {layout.get('hnsw_m')}, efSearch {layout.get('ef_search')}"
    return [
        f"  index          {kind} ({layout.get('metric', '?')}{tuning}), "
        f"{blob['counts']['rows']} vectors: {paths.url(paths.index_file)} (+ ids.parquet)",
        f"  search         python launch.py search {shlex.quote(paths.root)} 'some text' -k 10",
    ]
