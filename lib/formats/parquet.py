"""Row tables (parquet) in a run dir: the schemas stages share, and publish/read helpers.

Row metadata keeps a row's original dataset index (``row_index``) through every stage
(DESIGN.md contract 6). The dropped-rows table is written by the embed stage and merged
by the merge stage.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from lib.core.storage import OutputFile, Storage

DROPPED_SCHEMA = pa.schema(
    [
        ("row_index", pa.int64()),
        ("id", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
        ("token_count", pa.int64()),
    ]
)


def publish_table(storage: Storage, name: str, table: pa.Table, **kwargs) -> OutputFile:
    """Publish ``table`` as the parquet file ``name`` (``kwargs`` go to ``write_table``)."""
    with storage.publish(name) as staged:
        pq.write_table(table, staged.path, **kwargs)
    assert staged.output is not None
    return staged.output


def read_table(storage: Storage, name: str, columns: list[str] | None = None) -> pa.Table:
    """The parquet file ``name`` (``FileNotFoundError`` if it does not exist); from an
    object store it is read into memory, not cached (use ``storage.local_path`` for big
    tables read more than once)."""
    if storage.is_local:
        return pq.read_table(storage.local_path(name), columns=columns)
    return pq.read_table(pa.BufferReader(storage.read_bytes(name)), columns=columns)
