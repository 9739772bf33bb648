"""``merge.metadata_path``: per-row metadata joined into ``metadata.parquet`` by row index.

The file is row-aligned with the dataset: its row i describes dataset row i (an articles
file of ``{id, title, url, text}``, say). It is a parquet file, a JSON-lines file, or (only
with ``merge.allow_pickle=true``, the seed runs' ``wikipedia.pkl``) a pickled list of
dicts. Parquet and JSON lines are streamed in record batches, never loaded whole; the merge
asks for increasing row indices, so a cursor keeps only the batches that span the rows of
the current chunk. Its columns are added to the merge's own (``row_index``, ``id``,
``source``, the embed metadata); a column of the same name replaces the merge's, except
``row_index``, which, if the file has one, must equal the row's position in the file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from lib.core.errors import ShardValidationError
from lib.core.storage import is_url

log = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PICKLE_SUFFIXES = (".pkl", ".pickle")
BATCH_ROWS = 65536
# Columns that are strings in the merge's own metadata: the file's replace them as strings.
STRING_COLUMNS = ("id", "source")


def _open(path: str) -> BinaryIO:
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


class MetadataFile:
    """A row-aligned metadata file (``merge.metadata_path``), opened lazily.

    Raises ``ShardValidationError`` naming the file: it does not exist, has a suffix of no
    known format, or is a pickle without ``allow_pickle``."""

    def __init__(self, path: str, allow_pickle: bool) -> None:
        self.path = str(path)
        suffix = Path(self.path.split("?", 1)[0]).suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            self.kind = "parquet"
        elif suffix in JSONL_SUFFIXES:
            self.kind = "jsonl"
        elif suffix in PICKLE_SUFFIXES:
            self.kind = "pickle"
        else:
            raise ShardValidationError(
                f"merge.metadata_path={self.path}: unknown format {suffix or '(no suffix)'}; "
                "use a .parquet or .jsonl file (or a .pkl list of dicts with "
                "merge.allow_pickle=true)"
            )
        if self.kind == "pickle" and not allow_pickle:
            raise ShardValidationError(
                f"merge.metadata_path={self.path} is a pickle, and loading a pickle runs "
                "whatever code it contains. Only for a file you produced yourself: set "
                "merge.allow_pickle=true (or convert it to parquet)."
            )
        if not is_url(self.path) and not Path(self.path).is_file():
            raise ShardValidationError(
                f"merge.metadata_path={self.path} does not exist (or is not a file)"
            )
        self._records: list[Any] | None = None

    def _pickled(self) -> list[Any]:
        if self._records is None:
            import pickle

            log.warning(
                "loading the pickled metadata %s: unpickling runs code from that file "
                "(allowed by merge.allow_pickle=true)",
                self.path,
            )
            with _open(self.path) as fh:
                records = pickle.load(fh)
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ShardValidationError(
                    f"merge.metadata_path={self.path}: expected a pickled list of dicts (one "
                    f"per dataset row), found {type(records).__name__}"
                )
            self._records = records
        return self._records

    def count_rows(self) -> int:
        """Rows in the file: parquet's footer, one pass over JSON lines (non-blank lines),
        or the length of the pickled list."""
        if self.kind == "parquet":
            with _open(self.path) as fh:
                return pq.ParquetFile(fh).metadata.num_rows
        if self.kind == "jsonl":
            with _open(self.path) as fh:
                return sum(1 for line in fh if line.strip())
        return len(self._pickled())

    def batches(self, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """The file's rows in order, a record batch at a time."""
        try:
            if self.kind == "parquet":
                with _open(self.path) as fh:
                    yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_rows)
            elif self.kind == "jsonl":
                with _open(self.path) as fh:
                    yield from pj.open_json(fh)
            else:
                records = self._pickled()
                for i in range(0, len(records), batch_rows):
                    yield from pa.Table.from_pylist(records[i : i + batch_rows]).to_batches()
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ShardValidationError(
                f"merge.metadata_path={self.path}: cannot read it as {self.kind} ({exc}); "
                "a JSON-lines file needs one type per key on every line (convert it to "
                "parquet to fix the types)"
            ) from exc


class RowCursor:
    """The rows of a ``MetadataFile`` by dataset row index, for indices that only increase
    from one call to the next; only the batches spanning the current request are held."""

    def __init__(self, source: MetadataFile) -> None:
        self.source = source
        self._batches = source.batches()
        self._held: list[pa.RecordBatch] = []
        self._base = 0  # the file row of the first held batch's first row
        self._end = 0  # one past the last held row

    def take(self, row_index: np.ndarray) -> pa.Table:
        """The file's rows at ``row_index`` (sorted, not empty, none below an earlier
        call's), without a ``row_index`` column (checked against the positions)."""
        first, last = int(row_index[0]), int(row_index[-1])
        while self._end <= last:
            try:
                batch = next(self._batches)
            except StopIteration:
                raise ShardValidationError(
                    f"merge.metadata_path={self.source.path}: ended at row {self._end}, but "
                    f"the merge needs dataset row {last}; the file must hold one row per "
                    "dataset row"
                ) from None
            self._held.append(batch)
            self._end += batch.num_rows
        while self._held and self._base + self._held[0].num_rows <= first:
            self._base += self._held.pop(0).num_rows
        table = pa.Table.from_batches(self._held)
        taken = table.take(pa.array(row_index - self._base))
        if "row_index" in taken.column_names:
            given = taken.column("row_index").cast(pa.int64()).to_numpy()
            bad = np.flatnonzero(given != row_index)
            if bad.size:
                p = int(bad[0])
                raise ShardValidationError(
                    f"merge.metadata_path={self.source.path}: row {int(row_index[p])} has "
                    f"row_index {int(given[p])}: the file is not row-aligned with the "
                    "dataset (sort it by row_index, one row per dataset row)"
                )
            taken = taken.drop_columns(["row_index"])
        return taken


def join_columns(table: pa.Table, extra: pa.Table) -> pa.Table:
    """``table`` (the merge's metadata rows) with the columns of ``extra`` (the same rows
    from the metadata file): added, or replacing the same-named column."""
    for name in extra.column_names:
        column = extra.column(name)
        if name in STRING_COLUMNS and not pa.types.is_string(column.type):
            column = pc.cast(column, pa.string())
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column)
        else:
            table = table.append_column(name, column)
    return table
