"""Row sources: read contiguous row ranges of a dataset without loading all of it.

``open_source(cfg)`` returns a ``RowSource`` for parquet, jsonl or csv files (local paths
or fsspec URLs), a directory of such files (one dataset, its files in sorted order),
Hugging Face ``datasets`` (a name in the local cache, or a ``save_to_disk`` directory),
and the builtin quickstart corpus. ``read(start, stop)`` returns a pyarrow table of those
rows; parquet reads only the row groups that overlap the range.

jsonl and csv are decoded with ``dataset.encoding``: UTF-8 is left to pyarrow (a CSV
column that is not valid UTF-8 arrives as bytes and is decoded per row by
``lib.data.text``); another codec transcodes the file first, naming the byte offset and
line of a byte that does not decode.
"""

from __future__ import annotations

import bisect
import codecs
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from lib.core.errors import DatasetError
from lib.data.params import DatasetFormat, EncodingErrors

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


# Files a directory dataset ignores: Spark/Hadoop markers, hidden and cache files.
_IGNORED_PREFIXES = (".", "_")
# A Hugging Face save_to_disk directory (read with datasets.load_from_disk).
_HF_SAVED_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def _is_url(path: str) -> bool:
    return "://" in path


def suffix_format(path: str) -> DatasetFormat | None:
    """The format a file name's suffix says (``.parquet`` -> parquet), None if unknown."""
    return _SUFFIX_FORMATS.get(Path(path.split("?")[0]).suffix.lower())


def is_dir(path: str) -> bool:
    if _is_url(path):
        fs, p = fsspec.core.url_to_fs(path)
        return bool(fs.isdir(p))
    return os.path.isdir(path)


def is_hf_saved_dir(path: str) -> bool:
    return not _is_url(path) and any(os.path.exists(os.path.join(path, f)) for f in _HF_SAVED_FILES)


def dataset_files(path: str, fmt: DatasetFormat = DatasetFormat.auto) -> list[str]:
    """The data files of the directory ``path`` (local or URL), recursively, in sorted
    order of their relative paths: every parquet/jsonl/csv file (only ``fmt``'s when it is
    one of those), hidden and ``_``-prefixed files and folders skipped. Raises
    ``DatasetError`` when there is none."""
    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    found: list[tuple[str, str]] = []
    for full in fs.find(root):
        rel = full[len(root) :].lstrip("/")
        if any(part.startswith(_IGNORED_PREFIXES) for part in rel.split("/")):
            continue
        kind = suffix_format(rel)
        if kind is None or (fmt not in (DatasetFormat.auto, kind)):
            continue
        found.append((rel, full))
    if not found:
        wanted = fmt.value if fmt != DatasetFormat.auto else "parquet, jsonl or csv"
        raise DatasetError(
            f"dataset directory {path} has no {wanted} files (suffixes "
            f"{', '.join(sorted(_SUFFIX_FORMATS))}); point dataset.path to a data file or a "
            "directory of them (dataset.format=hf for a Hugging Face save_to_disk directory)"
        )
    found.sort()
    if _is_url(path):
        protocol = path.split("://", 1)[0]
        return [f"{protocol}://{full}" for _, full in found]
    return [full for _, full in found]


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
    fingerprint: str | None = None  # the datasets library's, for a Hugging Face dataset

    def __post_init__(self) -> None:
        self.num_rows = self.table.num_rows
        self.columns = list(self.table.column_names)

    def read(self, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        t = self.table.slice(start, stop - start)
        return t.select(columns) if columns else t


@dataclass
class MultiSource:
    """A directory of files read as one dataset: the files' rows one after another, in
    ``dataset_files`` order. Every file must have the first file's columns."""

    description: str
    sources: list[RowSource]
    _starts: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.columns = list(self.sources[0].columns)
        for src in self.sources[1:]:
            missing = [c for c in self.columns if c not in src.columns]
            if missing:
                raise DatasetError(
                    f"dataset directory {self.description}: {src.description} lacks column(s) "
                    f"{', '.join(map(repr, missing))} that {self.sources[0].description} has; "
                    "every file of a directory dataset needs the same columns"
                )
        offset = 0
        for src in self.sources:
            self._starts.append(offset)
            offset += src.num_rows
        self.num_rows = offset

    def read(self, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        cols = columns or self.columns
        tables = []
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while i < len(self.sources) and self._starts[i] < stop:
            s0 = self._starts[i]
            a, b = max(start, s0) - s0, min(stop, s0 + self.sources[i].num_rows) - s0
            if b > a:
                tables.append(self.sources[i].read(a, b, cols))
            i += 1
        if not tables:
            return self.sources[0].read(0, 0, cols)
        return pa.concat_tables(tables, promote_options="permissive")


def _transcode(path: str, raw: bytes, encoding: str, errors: EncodingErrors) -> bytes:
    """``raw`` (in ``encoding``) as valid UTF-8 for pyarrow. Raises ``DatasetError`` naming
    the byte offset and line of the first byte that does not decode (``errors=error``)."""
    mode = "replace" if EncodingErrors(errors) == EncodingErrors.replace else "strict"
    utf8 = codecs.lookup(encoding).name == "utf-8"
    try:
        text = raw.decode(encoding, mode)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DatasetError(
            f"{path}: byte offset {exc.start} (line {line}) is not valid {encoding} "
            f"({exc.reason}, {raw[exc.start : exc.start + 4]!r}). Set dataset.encoding to "
            "the file's encoding (e.g. latin-1, cp1252), or dataset.encoding_errors=replace "
            "to read undecodable bytes as U+FFFD, or fix the file."
        ) from exc
    if utf8 and mode == "strict":
        return raw  # valid as it is: no second copy
    return text.encode("utf-8")


def _read_bytes(path: str) -> bytes:
    with fsspec.open(path, "rb") as fh:
        return fh.read()


def _read_jsonl(
    path: str, encoding: str = "utf-8", errors: EncodingErrors = EncodingErrors.error
) -> pa.Table:
    import pyarrow.json as pj

    # pyarrow's JSON reader does not check UTF-8: a bad byte would surface later, far
    # from its line. Every byte is checked (or replaced) here.
    data = _transcode(path, _read_bytes(path), encoding, errors)
    try:
        return pj.read_json(pa.BufferReader(data))
    except pa.ArrowInvalid as exc:
        raise DatasetError(
            f"{path}: not valid JSON lines ({exc}); each line must be one JSON object"
        ) from exc


def _read_csv(
    path: str, encoding: str = "utf-8", errors: EncodingErrors = EncodingErrors.error
) -> pa.Table:
    import pyarrow.csv as pc

    # UTF-8 is left to pyarrow: a column with bytes that are not UTF-8 arrives as binary
    # and is decoded per row (``lib.data.text``), so errors name the row.
    data = _read_bytes(path)
    if codecs.lookup(encoding).name != "utf-8":
        data = _transcode(path, data, encoding, errors)
    try:
        return pc.read_csv(pa.BufferReader(data))
    except pa.ArrowInvalid as exc:
        raise DatasetError(f"{path}: not valid CSV ({exc})") from exc


def hf_source(
    path: str, split: str, subset: str | None = None, cache_dir: Path | None = None
) -> TableSource:
    import datasets

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        if is_hf_saved_dir(path):
            ds = datasets.load_from_disk(path)
        elif os.path.isdir(path):
            # Raw files read by a datasets builder: its Arrow cache goes under our cache
            # dir, never into ~/.cache/huggingface.
            base = cache_dir or Path(tempfile.gettempdir()) / "embedfleet-cache"
            hf_cache = str(Path(base) / "hf-datasets")
            ds = datasets.load_dataset(path, subset, split=split, cache_dir=hf_cache)
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
    return TableSource(
        f"hf:{path}[{split}]", ds.with_format("arrow")[:], getattr(ds, "_fingerprint", None)
    )


def resolve_format(path: str, fmt: DatasetFormat) -> DatasetFormat:
    """The format of ``path`` when ``fmt`` is auto: builtin, by suffix, ``hf`` for a hub
    name or a save_to_disk directory. A directory of data files keeps ``auto`` (each file
    by its suffix; see ``dataset_files``)."""
    if fmt != DatasetFormat.auto:
        return fmt
    if path.startswith("builtin:"):
        return DatasetFormat.builtin
    if (kind := suffix_format(path)) is not None:
        return kind
    if not _is_url(path) and not os.path.exists(path):
        # A bare name such as "org/dataset" is a Hugging Face dataset id.
        return DatasetFormat.hf if "/" in path and not path.startswith((".", "/")) else fmt
    if is_hf_saved_dir(path):
        return DatasetFormat.hf
    if is_dir(path):
        return DatasetFormat.auto
    raise DatasetError(
        f"cannot tell the format of {path!r} from its name; set dataset.format to one of "
        f"{', '.join(f.value for f in DatasetFormat if f != DatasetFormat.auto)}"
    )


def _open_file(path: str, fmt: DatasetFormat, encoding: str, errors: EncodingErrors) -> RowSource:
    if fmt == DatasetFormat.parquet:
        return ParquetSource(path)
    if fmt == DatasetFormat.jsonl:
        return TableSource(path, _read_jsonl(path, encoding, errors))
    if fmt == DatasetFormat.csv:
        return TableSource(path, _read_csv(path, encoding, errors))
    raise DatasetError(f"unsupported dataset format {fmt}")


def open_source(
    path: str,
    fmt: DatasetFormat,
    split: str = "train",
    cache_dir: Path | None = None,
    subset: str | None = None,
    encoding: str = "utf-8",
    encoding_errors: EncodingErrors = EncodingErrors.error,
) -> RowSource:
    """Open a dataset for range reads. Raises ``DatasetError`` naming the path and the fix."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DatasetError(
            f"dataset.encoding={encoding!r} is not a codec Python knows; use e.g. utf-8, "
            "latin-1, cp1252, utf-16"
        ) from None
    requested = DatasetFormat(fmt)
    fmt = resolve_format(path, requested)
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
        return hf_source(path, split, subset, cache_dir)
    if not _exists(path):
        raise DatasetError(
            f"dataset file {path} does not exist; set dataset.path to a parquet/jsonl/csv file, "
            "a directory of them, an fsspec URL, or a Hugging Face dataset name with "
            "dataset.format=hf"
        )
    if is_dir(path):
        files = dataset_files(path, requested)
        sources = [_open_file(f, suffix_format(f) or fmt, encoding, encoding_errors) for f in files]
        return MultiSource(path, sources)
    return _open_file(path, fmt, encoding, encoding_errors)
