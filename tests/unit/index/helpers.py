"""A run dir holding only a finished merge (embeddings, metadata, quality report, marker),
made from an array: what the index stage reads, without embedding anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from lib.core.markers import CompletionMarker, write_marker
from lib.core.paths import MERGE_DIR, RunPaths
from lib.formats.arrays import publish_npy
from lib.formats.parquet import publish_table

MERGE_HASH = "merge-hash"


def merged_run(root: Path, x: np.ndarray, *, first_row: int = 0, gap_every: int = 0) -> RunPaths:
    """A run dir at ``root`` whose merge produced ``x`` (npy). Dataset rows start at
    ``first_row``; ``gap_every`` > 0 skips every such row (as if dropped)."""
    paths = RunPaths(root)
    storage = paths.storage
    n = len(x)
    rows = np.arange(first_row, first_row + n * (2 if gap_every else 1), dtype=np.int64)
    if gap_every:
        rows = rows[rows % gap_every != 0][:n]
    outputs = publish_npy(storage, paths.merge_embeddings("npy"), np.ascontiguousarray(x))
    table = pa.table(
        {
            "row_index": pa.array(rows, pa.int64()),
            "id": pa.array([f"doc-{r}" for r in rows], pa.string()),
            "source": pa.array([f"src{r % 3}" for r in rows], pa.string()),
        }
    )
    outputs.append(publish_table(storage, paths.merge_metadata, table))
    norms = np.linalg.norm(x, axis=1) if n else np.zeros(0)
    report = {
        "shape": [n, int(x.shape[1])],
        "l2_norm": {
            "min": float(norms.min()) if n else None,
            "max": float(norms.max()) if n else None,
        },
    }
    outputs.append(storage.publish_json(paths.merge_report, report))
    marker = CompletionMarker("merge", 0, 1, MERGE_HASH, row_range=[0, n], outputs=outputs)
    write_marker(storage, paths.marker(MERGE_DIR, 0), marker)
    return paths
