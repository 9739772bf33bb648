"""The merge stage's row tables and its per-source split.

``metadata.parquet`` (row i describes merged embeddings row i: ``row_index`` = original
dataset row, ``id``, ``source``, metadata columns, and the columns of
``merge.metadata_path`` joined by row index), ``dropped_rows.parquet`` (every row
not embedded, by original index) and ``by_source/<source>/`` (embeddings and metadata of
each source, with ``by_source/index.json``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lib.core.errors import ShardValidationError
from lib.core.paths import RunPaths
from lib.core.storage import OutputFile, Storage
from lib.data.columns import duplicate_ids
from lib.formats.arrays import open_embeddings
from lib.formats.matrix_writer import MatrixWriter
from lib.formats.parquet import DROPPED_SCHEMA, publish_table, read_table
from lib.merge.inputs import ShardInput
from lib.merge.row_metadata import BATCH_ROWS, MetadataFile, RowCursor, join_columns


def _shard_table(s: ShardInput) -> pa.Table:
    """A shard's metadata rows: its parquet, or (legacy) row indices, ids, ``legacy``."""
    if s.metadata is not None and s.storage is not None:
        return read_table(s.storage, s.metadata)
    idx = np.arange(s.row_start, s.row_stop, dtype=np.int64)
    ids = s.ids if s.ids is not None else idx.astype(str)
    return pa.table(
        {"row_index": idx, "id": pa.array(ids, pa.string()), "source": ["legacy"] * len(idx)}
    )


def _write(
    writer: pq.ParquetWriter | None, path: Path, table: pa.Table, extra: MetadataFile | None
) -> pq.ParquetWriter:
    if writer is None:
        writer = pq.ParquetWriter(path, table.schema)
    elif table.schema != writer.schema:
        try:
            table = table.cast(writer.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
            where = f"merge.metadata_path={extra.path}" if extra else "the shards' metadata"
            raise ShardValidationError(
                f"{where}: the columns change type between rows ({exc}); give each column "
                "one type (a parquet file with a fixed schema)"
            ) from exc
    writer.write_table(table)
    return writer


def merge_metadata(
    inputs: list[ShardInput],
    storage: Storage,
    name: str,
    keep_first: int | None,
    extra: MetadataFile | None = None,
    chunk_rows: int = BATCH_ROWS,
) -> OutputFile:
    """Concatenate shard metadata (row_index, id, source, ...) in order, streamed by shard;
    with ``extra`` (``merge.metadata_path``), each chunk of ``chunk_rows`` rows joined with
    the file's rows of the same dataset row indices (``lib.merge.row_metadata``)."""
    ordered = sorted(inputs, key=lambda s: s.row_start)
    cursor = RowCursor(extra) if extra is not None else None
    writer: pq.ParquetWriter | None = None
    left = keep_first
    with storage.publish(name) as staged:
        try:
            table = None
            for s in ordered:
                table = _shard_table(s)
                if left is not None:
                    table = table.slice(0, left)
                    left -= table.num_rows
                if cursor is None:
                    writer = _write(writer, staged.path, table, extra)
                    continue
                for i in range(0, table.num_rows, chunk_rows):
                    part = table.slice(i, chunk_rows)
                    rows = part.column("row_index").to_numpy()
                    writer = _write(
                        writer, staged.path, join_columns(part, cursor.take(rows)), extra
                    )
            if writer is None and table is not None:
                writer = _write(writer, staged.path, table, extra)  # no row at all
        finally:
            if writer is not None:
                writer.close()
    assert staged.output is not None
    return staged.output


def needed_rows(inputs: list[ShardInput], keep_first: int | None) -> int:
    """One past the dataset row index of the last merged row (after ``keep_first``): how
    many rows a row-aligned metadata file must have. Reads at most one shard's row indices
    (of the shard holding the last merged row, when it dropped rows)."""
    left = keep_first if keep_first is not None else sum(s.rows for s in inputs)
    last = 0
    for s in sorted(inputs, key=lambda s: s.row_start):
        if left <= 0:
            break
        k = min(left, s.rows)
        if k == 0:
            continue
        left -= k
        if s.rows == s.row_stop - s.row_start or s.metadata is None or s.storage is None:
            last = s.row_start + k - 1
        else:
            idx = read_table(s.storage, s.metadata, ["row_index"]).column(0)
            last = int(idx[k - 1].as_py())
    return last + 1


def check_metadata_rows(
    extra: MetadataFile, inputs: list[ShardInput], keep_first: int | None
) -> None:
    """Refuse, before anything is written, a metadata file with fewer rows than the merge
    needs (``ShardValidationError`` naming the file and both counts)."""
    have, need = extra.count_rows(), needed_rows(inputs, keep_first)
    if have < need:
        total = sum(s.rows for s in inputs)
        merged = total if keep_first is None else min(keep_first, total)
        raise ShardValidationError(
            f"merge.metadata_path={extra.path} has {have} rows, but the merged matrix has "
            f"{merged} rows reaching dataset row {need - 1}: row i of the file describes "
            f"dataset row i, so it needs at least {need} rows (use the file of the whole "
            "dataset, or merge.keep_first to merge fewer rows); nothing written"
        )


def merge_dropped(inputs: list[ShardInput], storage: Storage, name: str) -> tuple[int, OutputFile]:
    """All dropped rows, sorted by original index; (how many, the published file)."""
    tables = [
        read_table(s.storage, s.dropped)
        for s in inputs
        if s.dropped is not None and s.storage is not None
    ]
    table = pa.concat_tables(tables) if tables else DROPPED_SCHEMA.empty_table()
    table = table.sort_by("row_index")
    return table.num_rows, publish_table(storage, name, table)


def duplicate_ids_of(storage: Storage, metadata: str) -> tuple[int, dict[str, list[int]]]:
    """Duplicate ids of the merged rows (``lib.data.columns.duplicate_ids``): how many rows
    repeat an earlier id, and the first few ids with the dataset rows that carry them."""
    table = read_table(storage, metadata, ["id", "row_index"])
    count, examples = duplicate_ids(table.column("id"))
    row_index = table.column("row_index").to_numpy()
    return count, {k: [int(row_index[p]) for p in v] for k, v in examples.items()}


def _dir_name(source: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("._") or "source"
    name, n = base, 2
    while name in used:
        name, n = f"{base}-{n}", n + 1
    used.add(name)
    return name


def split_by_source(
    paths: RunPaths, merged: str, metadata: str, chunk_rows: int
) -> tuple[dict, list[OutputFile]]:
    """Write ``by_source/<source>/`` embeddings + metadata, gathering rows in chunks.
    Returns the index (source -> dir, rows) and every published file, for the marker."""
    storage = paths.storage
    emb = open_embeddings(storage.local_path(merged))
    meta = read_table(storage, metadata)
    dict_arr = pc.dictionary_encode(meta.column("source")).combine_chunks()
    codes = dict_arr.indices.to_numpy()
    uniques = dict_arr.dictionary.to_pylist()
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    used: set[str] = set()
    index = {}
    outputs: list[OutputFile] = []
    file_name = Path(merged).name
    for code, source in enumerate(uniques):
        positions = order[bounds[code] : bounds[code + 1]]
        name = _dir_name(str(source), used)
        target = paths.merge_source_file(name, file_name)
        with storage.publish(target, digest=False) as staged:
            writer = MatrixWriter(
                staged.path, len(positions), emb.shape[1], str(emb.dtype), name=target
            )
            try:
                for i in range(0, len(positions), chunk_rows):
                    writer.write(np.asarray(emb[positions[i : i + chunk_rows]]))
                staged.sha256 = writer.close()
            except BaseException:
                writer.abort()
                raise
        assert staged.output is not None
        outputs.append(staged.output)
        outputs.append(
            publish_table(
                storage,
                paths.merge_source_file(name, "metadata.parquet"),
                meta.take(pa.array(positions)),
            )
        )
        index[str(source)] = {"dir": name, "rows": len(positions)}
    outputs.append(storage.publish_json(paths.merge_by_source_index, index))
    return index, outputs
