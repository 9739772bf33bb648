"""The index task: check the merged embeddings against the merge's marker, build the
index (``lib.index.build``), publish ``index/index.faiss``, ``index/ids.parquet`` and
``index/params.json``, then the marker naming them with their sha256.

One index task per run, so every temporary under ``index/`` at its start is a leftover of
a killed build: it is removed first and the build starts over (an index has no useful
partial state). Nothing is published until the whole index is built, and the marker
comes last: a killed build leaves no file that looks complete.
"""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np
import pyarrow as pa

from lib.core.errors import DatasetError, UpstreamIncompleteError
from lib.core.markers import CompletionMarker, require_intact, write_marker
from lib.core.paths import INDEX_DIR, MERGE_DIR, RunPaths
from lib.core.storage import OutputFile, Storage
from lib.formats.arrays import open_embeddings
from lib.formats.matrix_reader import MatrixReader
from lib.formats.parquet import publish_table, read_table
from lib.index.build import build_index
from lib.index.choice import IndexLayout, choose_layout, choose_metric
from lib.index.params import IndexParams
from lib.index.plan import index_params
from lib.runtime.context import TaskContext

log = logging.getLogger(__name__)

ID_COLUMNS = ("row_index", "id", "source")
SETTINGS_VERSION = 1


def id_table(storage: Storage, metadata: str, rows: int) -> pa.Table:
    """The id map: faiss id (= merged row) -> ``row_index`` (the original dataset row),
    ``id``, ``source``, from the merge's ``metadata.parquet``. Raises ``DatasetError``
    when it lacks those columns or its row count is not ``rows``."""
    where = storage.url(metadata)
    try:
        table = read_table(storage, metadata)
    except FileNotFoundError:
        raise DatasetError(f"{where} does not exist; rerun the merge stage") from None
    missing = [c for c in ID_COLUMNS if c not in table.column_names]
    if missing:
        raise DatasetError(f"{where}: missing columns {missing} (has {table.column_names})")
    if table.num_rows != rows:
        raise DatasetError(
            f"{where} has {table.num_rows} rows but the merged embeddings {rows}: they come "
            "from different merges; rerun the merge stage"
        )
    table = table.select(list(ID_COLUMNS))
    return table.add_column(0, "faiss_id", pa.array(np.arange(rows, dtype=np.int64)))


def settings_json(layout: IndexLayout, embeddings: str) -> dict:
    """``index/params.json``: the layout (kind, metric, nlist, nprobe, efSearch, ...), what
    it was built from, and the faiss version."""
    return {
        "version": SETTINGS_VERSION,
        **layout.to_json(),
        "embeddings": embeddings,
        "faiss_version": faiss.__version__,
    }


def publish_index(storage: Storage, name: str, index: faiss.Index) -> OutputFile:
    with storage.publish(name) as staged:
        faiss.write_index(index, str(staged.path))
    assert staged.output is not None
    return staged.output


def write_index(
    paths: RunPaths,
    params: IndexParams,
    *,
    embeddings: str,
    config_hash: str,
    stage: str = "index",
) -> CompletionMarker:
    """Build the index of the merged matrix ``embeddings`` (a name in the run dir) and
    publish it with its id map, settings and marker. Returns the marker.

    Raises ``UpstreamIncompleteError`` without a merge marker, ``InvalidMarkerError``
    (having invalidated the merge's marker) when the matrix or metadata no longer match
    it, ``ConfigError`` for settings that do not fit the rows, ``DatasetError`` for
    mismatched tables; nothing is published then."""
    started = time.monotonic()
    storage = paths.storage
    removed = storage.clean_temporaries(f"{INDEX_DIR}/")
    if removed:
        log.info("removed %d temporary file(s) of an interrupted index build", removed)
    merge_marker = paths.marker(MERGE_DIR, 0)
    if require_intact(storage, merge_marker, only=[embeddings, paths.merge_metadata]) is None:
        raise UpstreamIncompleteError(
            f"index cannot start: {paths.url(merge_marker)} does not exist; run the merge "
            "stage first"
        )
    metric = choose_metric(
        params.metric, storage.read_json(paths.merge_report), paths.url(paths.merge_report)
    )
    reader = MatrixReader(open_embeddings(storage.local_path(embeddings)))
    layout = choose_layout(params, reader.rows, reader.dim, metric)
    ids = id_table(storage, paths.merge_metadata, reader.rows)
    if params.threads:
        faiss.omp_set_num_threads(int(params.threads))
    log.info(
        "building a %s index (%s) of %d x %d vectors from %s",
        layout.kind,
        layout.metric,
        reader.rows,
        reader.dim,
        paths.url(embeddings),
    )
    index = build_index(layout, reader, seed=int(params.seed), chunk_rows=int(params.chunk_rows))
    outputs = [
        publish_index(storage, paths.index_file, index),
        publish_table(storage, paths.index_ids, ids),
        storage.publish_json(paths.index_params, settings_json(layout, embeddings)),
    ]
    marker = CompletionMarker(
        stage=stage,
        task=0,
        num_tasks=1,
        config_hash=config_hash,
        row_range=[0, reader.rows],
        counts={"rows": reader.rows, "dim": reader.dim, "nlist": layout.nlist},
        outputs=outputs,
        extra={"layout": layout.to_json(), "faiss_version": faiss.__version__},
        wall_seconds=time.monotonic() - started,
    )
    write_marker(storage, paths.marker(INDEX_DIR, 0), marker)
    log.info(
        "index done: %s (%s) of %d vectors in %.1fs",
        layout.kind,
        layout.metric,
        reader.rows,
        marker.wall_seconds,
    )
    return marker


def run(ctx: TaskContext) -> None:
    formats = [str(f) for f in ctx.cfg.merge.formats]
    write_index(
        ctx.paths,
        index_params(ctx.cfg),
        embeddings=ctx.paths.merge_embeddings(formats[0] if formats else "safetensors"),
        config_hash=ctx.spec.config_hash,
        stage=ctx.spec.name,
    )
