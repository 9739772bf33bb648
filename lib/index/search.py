"""Search a built index: load ``index/index.faiss`` with its id map and settings, query it
with vectors, and turn faiss ids back into dataset rows.

``load_index`` trusts nothing it has not checked: the index marker must exist, and every
file it names must still have its recorded size and sha256; an index faiss cannot read,
or whose vector count differs from its id map, is as broken as a changed file. Each of
these invalidates the marker (moved aside with the reason, ``lib.core.markers``), so the
next launch (``launch.py retry RUN_DIR``) rebuilds the index, and the message says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from lib.core.errors import DatasetError, EmbedfleetError, InvalidMarkerError
from lib.core.markers import (
    CompletionMarker,
    invalidate_marker,
    output_problems,
    read_marker,
)
from lib.core.paths import INDEX_DIR, RunPaths
from lib.formats.arrays import open_embeddings
from lib.formats.matrix_reader import MatrixReader
from lib.formats.parquet import read_table
from lib.index.params import IndexKind


class IndexMissingError(EmbedfleetError):
    """The run has no complete index (no marker in ``index/completions/``)."""


@dataclass(frozen=True)
class Hit:
    """One search result: ``rank`` (1 = nearest), ``score`` (inner product, or squared
    L2 distance: smaller is nearer), the faiss id (= merged row) and the dataset row."""

    rank: int
    score: float
    faiss_id: int
    row_index: int
    id: str
    source: str

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "score": self.score,
            "faiss_id": self.faiss_id,
            "row_index": self.row_index,
            "id": self.id,
            "source": self.source,
        }


@dataclass
class LoadedIndex:
    index: faiss.Index
    ids: pa.Table  # faiss_id, row_index, id, source
    settings: dict[str, Any]  # index/params.json
    marker: CompletionMarker

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def metric(self) -> str:
        return str(self.settings.get("metric", "ip"))


def _broken(paths: RunPaths, name: str, reason: str) -> InvalidMarkerError:
    """Invalidate the index marker for ``reason`` and return the error that says how to
    rebuild."""
    aside = invalidate_marker(paths.storage, name, reason)
    where = f" (marker moved to {paths.url(aside)})" if aside else ""
    return InvalidMarkerError(
        f"{reason}: the index is invalid{where}; rebuild it with "
        f"`python launch.py retry {paths.root}`"
    )


def load_index(paths: RunPaths) -> LoadedIndex:
    """The run's index, id map and settings, checked against the index marker.

    Raises ``IndexMissingError`` when the run has no index marker, ``InvalidMarkerError``
    (after invalidating the marker) when a file is missing, changed or unreadable."""
    storage = paths.storage
    name = paths.marker(INDEX_DIR, 0)
    try:
        marker = read_marker(storage, name)
    except FileNotFoundError:
        raise IndexMissingError(f"{paths.url(name)} does not exist: the run has no index") from None
    except InvalidMarkerError as exc:
        raise _broken(paths, name, str(exc)) from None
    problems = output_problems(storage, marker, verify_sha256=True)
    if problems:
        raise _broken(paths, name, "; ".join(problems.values()))
    local = storage.local_path(paths.index_file)
    try:
        index = faiss.read_index(str(local))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        reason = f"{paths.url(paths.index_file)} is not a faiss index ({first})"
        raise _broken(paths, name, reason) from None
    ids = read_table(storage, paths.index_ids)
    if ids.num_rows != index.ntotal:
        raise _broken(
            paths,
            name,
            f"{paths.url(paths.index_file)} holds {index.ntotal} vectors but "
            f"{paths.url(paths.index_ids)} maps {ids.num_rows}",
        )
    settings = storage.read_json(paths.index_params) or {}
    apply_settings(index, settings)
    return LoadedIndex(index, ids, settings, marker)


def apply_settings(
    index: faiss.Index,
    settings: dict[str, Any],
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> None:
    """Set ``nprobe`` (IVF) / ``efSearch`` (HNSW): the given values, else the saved ones."""
    kind = settings.get("kind")
    if kind in (IndexKind.ivf_flat, IndexKind.ivf_pq):
        value = nprobe or settings.get("nprobe")
        if value:
            ivf = faiss.extract_index_ivf(index)
            ivf.nprobe = min(int(value), int(ivf.nlist))
    elif kind == IndexKind.hnsw:
        value = ef_search or settings.get("ef_search")
        if value:
            index.hnsw.efSearch = int(value)


def search(loaded: LoadedIndex, queries: np.ndarray, k: int) -> list[list[Hit]]:
    """The ``k`` nearest rows of each query (rows of ``queries``), nearest first. Raises
    ``ValueError`` for ``k < 1`` or queries of another dimension."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if queries.shape[1] != loaded.dim:
        raise ValueError(
            f"queries have dimension {queries.shape[1]} but the index holds {loaded.dim}"
        )
    scores, faiss_ids = loaded.index.search(queries, min(k, loaded.index.ntotal))
    rows = loaded.ids.column("row_index").to_numpy()
    ident = loaded.ids.column("id").to_pylist()
    source = loaded.ids.column("source").to_pylist()
    out = []
    for srow, irow in zip(scores, faiss_ids, strict=True):
        hits = []
        for rank, (score, fid) in enumerate(zip(srow, irow, strict=True), start=1):
            if fid < 0:  # fewer than k found (an IVF probe of small lists)
                break
            f = int(fid)
            hits.append(Hit(rank, float(score), f, int(rows[f]), ident[f], source[f]))
        out.append(hits)
    return out


def faiss_id_of_row(loaded: LoadedIndex, dataset_row: int) -> int | None:
    """The faiss id (merged row) of dataset row ``dataset_row``; None when it was not
    embedded (dropped) or is outside the dataset."""
    rows = loaded.ids.column("row_index").to_numpy()
    pos = int(np.searchsorted(rows, dataset_row))  # merged rows keep dataset order
    if pos < len(rows) and int(rows[pos]) == dataset_row:
        return pos
    hits = np.flatnonzero(rows == dataset_row)
    return int(hits[0]) if len(hits) else None


def stored_vectors(paths: RunPaths, loaded: LoadedIndex, faiss_ids: list[int]) -> np.ndarray:
    """The merged embeddings of ``faiss_ids`` as the index was built from them (read from
    the merged matrix, exact whatever the index kind). Raises ``DatasetError`` when that
    matrix is gone or no longer has the index's shape."""
    name = str(loaded.settings.get("embeddings") or paths.merge_embeddings())
    try:
        reader = MatrixReader(open_embeddings(paths.storage.local_path(name)))
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise DatasetError(
            f"{paths.url(name)}: cannot read the merged embeddings ({exc})"
        ) from None
    if (reader.rows, reader.dim) != (loaded.index.ntotal, loaded.dim):
        raise DatasetError(
            f"{paths.url(name)} has shape ({reader.rows}, {reader.dim}) but the index was "
            f"built from ({loaded.index.ntotal}, {loaded.dim}): the merge was redone after "
            "the index; rerun the index stage"
        )
    return reader.take(np.asarray(faiss_ids, dtype=np.int64))
