"""Row sources: read contiguous row ranges of a dataset without loading all of it.

``open_source(cfg)`` returns a ``RowSource`` for parquet, jsonl or csv files (local paths
or fsspec URLs), Hugging Face ``datasets`` (a name in the local cache, or a directory),
and the builtin quickstart corpus. ``read(start, stop)`` returns a pyarrow table of those
rows; parquet reads only the row groups that overlap the range.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from lib.core.errors import DatasetError
from lib.data.params import DatasetFormat

log = logging.getLogger(__name__)

_SUFFIX_FORMATS = {
    ".parquet": DatasetFormat.parquet,
    ".pq": DatasetFormat.parquet,
    ".jsonl": DatasetFormat.jsonl,
    ".json": DatasetFormat.jsonl,
    ".ndjson": DatasetFormat.jsonl,
    ".csv": DatasetFormat.csv,
}


class RowSource(Protocol):
    description: str
    num_rows: int
    columns: list[str]

    def read(self, start: int, stop: int, columns: list[str] | None = None) -> pa.Table: ...


def _is_url(path: str) -> bool:
    return "://" in path


def _exists(path: str) -> bool:
    if _is_url(path):
        fs, p = fsspec.core.url_to_fs(path)
        return bool(fs.exists(p))
    return os.path.exists(path)


@dataclass
class ParquetSource:
    path: str

    def __post_init__(self) -> None:
        self.description = self.path
        fs, p = fsspec.core.url_to_fs(self.path)
        self._fs, self._p = fs, p
        try:
            self._file = pq.ParquetFile(fs.open(p, "rb"))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DatasetError(f"{self.path}: not a readable parquet file ({exc})") from exc
        md = self._file.metadata
        self.num_rows = md.num_rows
        self.columns = list(self._file.schema_arrow.names)
        self._group_starts = []
        offset = 0
        for i in range(md.num_row_groups):
            self._group_starts.append(offset)
            offset += md.row_group(i).num_rows

    def read(self, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        groups = []
        md = self._file.metadata
        for i, g0 in enumerate(self._group_starts):
            g1 = g0 + md.row_group(i).num_rows
            if g1 > start and g0 < stop:
                groups.append(i)
        if not groups:
            return self._file.schema_arrow.empty_table().select(columns or self.columns)
        table = self._file.read_row_groups(groups, columns=columns)
        first = self._group_starts[groups[0]]
        return table.slice(start - first, stop - start)


@dataclass
class TableSource:
    """A whole-file format (jsonl, csv) or an in-memory Arrow table, sliced per task."""

    description: str
    table: pa.Table

    def __post_init__(self) -> None:
        self.num_rows = self.table.num_rows
        self.columns = list(self.table.column_names)

    def read(self, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        t = self.table.slice(start, stop - start)
        return t.select(columns) if columns else t


def _read_jsonl(path: str) -> pa.Table:
    import pyarrow.json as pj

    with fsspec.open(path, "rb") as fh:
        try:
            return pj.read_json(fh)
        except pa.ArrowInvalid as exc:
            raise DatasetError(
                f"{path}: not valid JSON lines ({exc}); each line must be one JSON object"
            ) from exc


def _read_csv(path: str) -> pa.Table:
    import pyarrow.csv as pc

    with fsspec.open(path, "rb") as fh:
        try:
            return pc.read_csv(fh)
        except pa.ArrowInvalid as exc:
            raise DatasetError(f"{path}: not valid CSV ({exc})") from exc


def _hf_source(path: str, split: str, subset: str | None = None) -> TableSource:
    import datasets

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json")):
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(path, subset, split=split)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DatasetError(
                    f"{path}: no split {split!r}; available: {', '.join(ds)} (dataset.split=...)"
                )
            ds = ds[split]
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(
            f"Hugging Face dataset {path!r} (split {split!r}) could not be loaded from the local "
            f"cache ({exc}). embedfleet never downloads at run time: run "
            f"`datasets.load_dataset({path!r})` once where the hub is reachable, or point "
            "dataset.path to local parquet/jsonl files."
        ) from exc
    # The Arrow table behind the dataset (memory-mapped from the cache), in row order.
    return TableSource(f"hf:{path}[{split}]", ds.with_format("arrow")[:])


def resolve_format(path: str, fmt: DatasetFormat) -> DatasetFormat:
    if fmt != DatasetFormat.auto:
        return fmt
    if path.startswith("builtin:"):
        return DatasetFormat.builtin
    suffix = Path(path.split("?")[0]).suffix.lower()
    if suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffix]
    if not _is_url(path) and not os.path.exists(path):
        # A bare name such as "org/dataset" is a Hugging Face dataset id.
        return DatasetFormat.hf if "/" in path and not path.startswith((".", "/")) else fmt
    if os.path.isdir(path):
        return DatasetFormat.hf
    raise DatasetError(
        f"cannot tell the format of {path!r} from its name; set dataset.format to one of "
        f"{', '.join(f.value for f in DatasetFormat if f != DatasetFormat.auto)}"
    )


def open_source(
    path: str,
    fmt: DatasetFormat,
    split: str = "train",
    cache_dir: Path | None = None,
    subset: str | None = None,
) -> RowSource:
    """Open a dataset for range reads. Raises ``DatasetError`` naming the path and the fix."""
    fmt = resolve_format(path, fmt)
    if fmt == DatasetFormat.builtin:
        from lib.data.corpus import BUILTIN_CORPORA, builtin_corpus_path

        name = path.removeprefix("builtin:")
        if name not in BUILTIN_CORPORA:
            raise DatasetError(
                f"unknown builtin dataset {path!r}; available: "
                + ", ".join(f"builtin:{n}" for n in BUILTIN_CORPORA)
            )
        return ParquetSource(str(builtin_corpus_path(name, cache_dir or Path(".cache"))))
    if fmt == DatasetFormat.hf:
        return _hf_source(path, split, subset)
    if not _exists(path):
        raise DatasetError(
            f"dataset file {path} does not exist; set dataset.path to a parquet/jsonl/csv file, "
            "an fsspec URL, or a Hugging Face dataset name with dataset.format=hf"
        )
    if fmt == DatasetFormat.parquet:
        return ParquetSource(path)
    if fmt == DatasetFormat.jsonl:
        return TableSource(path, _read_jsonl(path))
    if fmt == DatasetFormat.csv:
        return TableSource(path, _read_csv(path))
    raise DatasetError(f"unsupported dataset format {fmt}")
