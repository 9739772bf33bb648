"""The merge stage's row tables and its per-source split.

``metadata.parquet`` (row i describes merged embeddings row i: ``row_index`` = original
dataset row, ``id``, ``source``, metadata columns), ``dropped_rows.parquet`` (every row
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

from lib.core.paths import RunPaths
from lib.core.storage import OutputFile, Storage
from lib.data.columns import duplicate_ids
from lib.formats.arrays import open_embeddings
from lib.formats.matrix_writer import MatrixWriter
from lib.formats.parquet import DROPPED_SCHEMA, publish_table, read_table
from lib.merge.inputs import ShardInput


def merge_metadata(
    inputs: list[ShardInput], storage: Storage, name: str, keep_first: int | None
) -> OutputFile:
    """Concatenate shard metadata (row_index, id, source, ...) in order, streamed by shard."""
    ordered = sorted(inputs, key=lambda s: s.row_start)
    writer = None
    left = keep_first
    with storage.publish(name) as staged:
        for s in ordered:
            if s.metadata is not None and s.storage is not None:
                table = read_table(s.storage, s.metadata)
            else:
                idx = np.arange(s.row_start, s.row_stop, dtype=np.int64)
                table = pa.table(
                    {"row_index": idx, "id": idx.astype(str), "source": ["legacy"] * len(idx)}
                )
            if left is not None:
                table = table.slice(0, left)
                left -= table.num_rows
            if writer is None:
                writer = pq.ParquetWriter(staged.path, table.schema)
            writer.write_table(table)
        if writer is not None:
            writer.close()
    assert staged.output is not None
    return staged.output


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
