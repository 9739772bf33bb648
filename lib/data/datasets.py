"""Row sources: read contiguous row ranges of a dataset without loading all of it.

``open_source(cfg)`` returns a ``RowSource`` for parquet, jsonl or csv files (local paths
or fsspec URLs), a directory of such files or a glob matching them (one dataset, its
files in sorted order; a task opens only the files its rows are in),
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import fsspec
import numpy as np
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

    def take(self, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """The rows at the sorted dataset indices ``rows``, in that order."""
        ...


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


def is_glob(path: str) -> bool:
    """A glob pattern (``*``, ``?``, ``[...]``) rather than one file or directory."""
    body = path.split("://", 1)[-1]
    return any(c in body for c in "*?[")


def glob_files(pattern: str, fmt: DatasetFormat = DatasetFormat.auto) -> list[str]:
    """The parquet/jsonl/csv files matching ``pattern`` (local or fsspec URL), sorted.
    Raises ``DatasetError`` when none matches."""
    fs, p = fsspec.core.url_to_fs(pattern)
    found = sorted(
        f
        for f in fs.glob(p)
        if fs.isfile(f)
        and (kind := suffix_format(f)) is not None
        and fmt in (DatasetFormat.auto, kind)
    )
    if not found:
        raise DatasetError(
            f"dataset.path={pattern} matches no parquet, jsonl or csv file; check the pattern "
            "(it is matched by fsspec's glob: * within a folder, ** across folders)"
        )
    if _is_url(pattern):
        protocol = pattern.split("://", 1)[0]
        return [f"{protocol}://{f}" for f in found]
    return found


def is_file_list(path: object) -> bool:
    """``dataset.path`` given as a list of files (and globs)."""
    return not isinstance(path, str) and isinstance(path, list | tuple | Sequence)


def listed_files(paths: Sequence[str], fmt: DatasetFormat = DatasetFormat.auto) -> list[str]:
    """The files of a ``dataset.path`` list: each entry a file, a directory or a glob,
    all of them in sorted order. Raises ``DatasetError`` naming an entry that is missing,
    matches nothing, or a file listed twice."""
    if not paths:
        raise DatasetError("dataset.path is an empty list; name at least one file")
    files: list[str] = []
    for entry in map(str, paths):
        if is_glob(entry):
            files += glob_files(entry, fmt)
        elif not _exists(entry):
            raise DatasetError(
                f"dataset.path lists {entry}, which does not exist; every entry must be a "
                "parquet/jsonl/csv file, a directory of them or a glob"
            )
        elif is_dir(entry):
            files += dataset_files(entry, fmt)
        elif suffix_format(entry) is None and fmt == DatasetFormat.auto:
            raise DatasetError(
                f"dataset.path lists {entry}: cannot tell its format from its name (use "
                ".parquet, .jsonl or .csv, or set dataset.format)"
            )
        else:
            files.append(entry)
    twice = sorted({f for f in files if files.count(f) > 1})
    if twice:
        raise DatasetError(f"dataset.path lists {twice[0]} more than once (directly or by a glob)")
    return sorted(files)


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

    def take(self, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return self._file.schema_arrow.empty_table().select(columns or self.columns)
        starts = np.asarray(self._group_starts, dtype=np.int64)
        group_of = np.searchsorted(starts, rows, side="right") - 1
        groups = np.unique(group_of)
        # Only the row groups holding a wanted row are read.
        table = self._file.read_row_groups([int(g) for g in groups], columns=columns)
        sizes = np.array([self._file.metadata.row_group(int(g)).num_rows for g in groups])
        offset_in_read = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        position = offset_in_read[np.searchsorted(groups, group_of)] + rows - starts[group_of]
        return table.take(pa.array(position, pa.int64()))


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

    def take(self, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        t = self.table.take(pa.array(np.asarray(rows, dtype=np.int64), pa.int64()))
        return t.select(columns) if columns else t


# Where Plan.extra keeps a many-file dataset's record (MultiSource.record()): the embed and
# extract tasks pass it to open_dataset, so each opens only the files of its rows.
FILES_RECORD_KEY = "dataset_files"


@dataclass
class MultiSource:
    """Many files read as one dataset (a directory, a glob or a list): the files' rows one
    after another, in the given order. Every file must have the first file's columns.

    ``opener`` opens one file. Given ``counts`` (each file's rows, as recorded at launch)
    and ``columns``, a file is opened only when a read touches its rows; ``opened`` lists
    the files opened so far, in order."""

    description: str
    files: list[str]
    opener: Callable[[str], RowSource]
    counts: list[int] | None = None
    known_columns: list[str] | None = None
    opened: list[str] = field(default_factory=list, init=False)
    _sources: dict[int, RowSource] = field(default_factory=dict, init=False, repr=False)
    _starts: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.counts is None or self.known_columns is None:
            for i in range(len(self.files)):
                self._source(i)
            counts = [self._sources[i].num_rows for i in range(len(self.files))]
            self.columns = list(self._sources[0].columns)
            for i in range(1, len(self.files)):
                self._check_columns(i)
        else:
            if len(self.counts) != len(self.files):
                raise DatasetError(
                    f"{self.description}: {len(self.files)} file(s) but {len(self.counts)} "
                    "row counts recorded at launch; the files changed: relaunch"
                )
            counts, self.columns = list(self.counts), list(self.known_columns)
        offset = 0
        for n in counts:
            self._starts.append(offset)
            offset += n
        self._counts = counts
        self.num_rows = offset

    def _check_columns(self, i: int) -> None:
        src = self._sources[i]
        missing = [c for c in self.columns if c not in src.columns]
        if missing:
            raise DatasetError(
                f"dataset {self.description}: {src.description} lacks column(s) "
                f"{', '.join(map(repr, missing))} that {self.files[0]} has; "
                "every file of a many-file dataset needs the same columns"
            )

    def _source(self, i: int) -> RowSource:
        if i not in self._sources:
            self._sources[i] = self.opener(self.files[i])
            self.opened.append(self.files[i])
            if self.counts is not None and self._sources[i].num_rows != self.counts[i]:
                raise DatasetError(
                    f"{self.files[i]}: has {self._sources[i].num_rows} rows, "
                    f"{self.counts[i]} when this run was launched; the file changed: relaunch "
                    "with a new run.name"
                )
        return self._sources[i]

    def record(self) -> dict:
        """Each file's rows and the columns, for ``plan.json`` (``open_source(files=...)``;
        kept in ``Plan.extra[FILES_RECORD_KEY]`` for the stages that read the dataset)."""
        return {
            "files": [[f, n] for f, n in zip(self.files, self._counts, strict=True)],
            "columns": list(self.columns),
        }

    def read(self, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        cols = columns or self.columns
        tables = []
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while i < len(self.files) and self._starts[i] < stop:
            s0 = self._starts[i]
            a, b = max(start, s0) - s0, min(stop, s0 + self._counts[i]) - s0
            if b > a:
                tables.append(self._source(i).read(a, b, cols))
            i += 1
        if not tables:
            return self._source(0).read(0, 0, cols)
        return pa.concat_tables(tables, promote_options="permissive")

    def take(self, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        cols = columns or self.columns
        rows = np.asarray(rows, dtype=np.int64)
        file_of = np.searchsorted(np.asarray(self._starts), rows, side="right") - 1
        tables = []
        for i in np.unique(file_of):
            mine = rows[file_of == i] - self._starts[int(i)]
            tables.append(self._source(int(i)).take(mine, cols))
        if not tables:
            return self._source(0).read(0, 0, cols)
        return pa.concat_tables(tables, promote_options="permissive")


@dataclass
class StreamSource:
    """A Hugging Face dataset read with ``datasets``' streaming mode (``dataset.streaming``):
    never materialised, rows decoded as they are read. A read of rows ``start..stop``
    iterates the stream from its beginning and skips the rows before ``start`` (a stream
    has no random access: they are read, not kept); a warning says so, and that an
    export as parquet files is read by row group instead. Only datasets whose files are
    not parquet get here (``hf_stream_source``)."""

    description: str
    dataset: Any  # datasets.IterableDataset
    num_rows: int
    _warned: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        features = getattr(self.dataset, "features", None)
        if features:
            self.columns = list(features)
        else:  # raw files without declared features: the first row's keys
            first = next(iter(self.dataset.take(1)), None)
            self.columns = list(first) if first else []

    def read(self, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        cols = columns or self.columns
        if start > 0 and not self._warned:
            log.warning(
                "%s: streaming reads and skips the %d rows before this task's range "
                "(a stream has no random access): its files are not parquet. Export it as "
                "parquet files and point dataset.path at them to skip by row group",
                self.description,
                start,
            )
            self._warned = True
        rows = list(self.dataset.skip(start).take(stop - start))
        if len(rows) < stop - start:
            raise DatasetError(
                f"{self.description}: the stream ended after {start + len(rows)} rows, but "
                f"this run planned {self.num_rows} (dataset.expected_rows or the dataset's "
                "info): set dataset.expected_rows to the dataset's row count"
            )
        if not rows:
            return pa.table({c: pa.array([], pa.string()) for c in cols})
        return pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows])

    def take(self, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return self.read(0, 0, columns)
        first = int(rows[0])
        table = self.read(first, int(rows[-1]) + 1, columns)
        return table.take(pa.array(rows - first, pa.int64()))


@dataclass
class HubFiles:
    """A Hugging Face hub dataset's data files for one split, found without reading them."""

    where: str  # the snapshot directory in the local hub cache, or the hub name (online)
    files: list[str]  # local paths in the snapshot, or hf:// URLs, sorted
    rows: int | None  # the split's row count in the dataset card, when it has one


def _hub_snapshot(path: str) -> str | None:
    """The local hub cache's snapshot of dataset ``path`` (``HF_HUB_CACHE``), or None."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return huggingface_hub.snapshot_download(path, repo_type="dataset", local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        return None


def hub_files(
    path: str, split: str, subset: str | None, cache_dir: Path | None = None
) -> HubFiles | None:
    """The data files of split ``split`` of hub dataset ``path`` (a name such as
    ``HuggingFaceFW/fineweb-edu``, config ``subset``), resolved as ``datasets`` does (the
    dataset card's ``configs:``, else the repository layout) without downloading: from
    the snapshot in the local hub cache, else, only when ``datasets`` is online
    (``HF_DATASETS_OFFLINE=0``), from the hub as ``hf://`` URLs. None when neither has
    the dataset. Raises ``DatasetError`` for a split or config it does not have."""
    if _is_url(path) or os.path.exists(path) or "/" not in path:
        return None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    where = _hub_snapshot(path)
    if where is None:
        if datasets.config.HF_HUB_OFFLINE:
            return None
        where = path
    base = cache_dir or Path(tempfile.gettempdir()) / "embedfleet-cache"
    try:
        builder = datasets.load_dataset_builder(
            where, subset, cache_dir=str(Path(base) / "hf-datasets")
        )
    except Exception as exc:
        raise DatasetError(
            f"Hugging Face dataset {path!r} (config {subset!r}, from {where}): its data files "
            f"could not be resolved ({exc}); set dataset.subset to one of its configs"
        ) from exc
    data_files = builder.config.data_files or {}
    if split not in data_files:
        raise DatasetError(
            f"Hugging Face dataset {path!r} (config {builder.config.name!r}) has no split "
            f"{split!r}; available: {', '.join(data_files) or 'none'} (dataset.split=...)"
        )
    splits = getattr(builder.info, "splits", None) or {}
    rows = splits[split].num_examples if split in splits else None
    return HubFiles(where, sorted(str(f) for f in data_files[split]), rows or None)


def hf_stream_source(
    path: str,
    split: str,
    subset: str | None,
    expected_rows: int | None,
    files: dict | None = None,
    cache_dir: Path | None = None,
) -> RowSource:
    """``path`` (a hub name, or a directory of raw files) for ``dataset.streaming``.

    Parquet is read by row group (``MultiSource``: each file's rows from its footer, a
    task opens only the files its range touches, ``files`` being the launch's record):
    a local directory of parquet files, and a hub dataset whose split's data files are
    all parquet, in the local hub cache (or through ``hf://`` when ``datasets`` is
    online). Anything else is streamed with ``datasets`` (``StreamSource``), a task
    reading and skipping the rows before its range. Raises ``DatasetError`` when the row
    count is unknown and ``expected_rows`` unset, or when the cache holds fewer rows than
    the dataset card says (a partial download)."""
    where = path
    if not _is_url(path) and os.path.isdir(path) and not is_hf_saved_dir(path):
        names = dataset_files(path)
        if all(suffix_format(f) == DatasetFormat.parquet for f in names):
            log.info("%s: parquet files, read by row group (no stream needed)", path)
            return many_files(path, names, DatasetFormat.auto, "utf-8", EncodingErrors.error, files)
    elif (hub := hub_files(path, split, subset, cache_dir)) is not None:
        where = hub.where
        if hub.files and all(suffix_format(f) == DatasetFormat.parquet for f in hub.files):
            description = f"hf:{path}[{split}]"
            source = many_files(
                description, hub.files, DatasetFormat.parquet, "utf-8", EncodingErrors.error, files
            )
            if hub.rows is not None and source.num_rows != hub.rows:
                raise DatasetError(
                    f"{description}: its {len(hub.files)} parquet file(s) in {hub.where} hold "
                    f"{source.num_rows} rows, its dataset card says {hub.rows}: the download "
                    "is partial or changed. Download the split's missing files, or point "
                    "dataset.path at the files you mean to embed (a glob, format=auto)"
                )
            log.info(
                "%s: %d parquet file(s) from %s, read by row group (not streamed)",
                description,
                len(hub.files),
                hub.where,
            )
            return source
    import datasets

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        ds = datasets.load_dataset(where, subset, split=split, streaming=True)
    except Exception as exc:
        raise DatasetError(
            f"Hugging Face dataset {path!r} (split {split!r}) could not be streamed from the "
            f"local cache ({exc}). embedfleet never downloads at run time."
        ) from exc
    splits = getattr(ds.info, "splits", None) or {}
    known = splits[split].num_examples if split in splits else None
    rows = known or expected_rows
    if not rows:
        raise DatasetError(
            f"hf:{path}[{split}] is streamed (dataset.streaming=true) and its info has no row "
            "count: set dataset.expected_rows to the number of rows (a stream is not counted, "
            "that would read it all)"
        )
    return StreamSource(f"hf:{path}[{split}] (streamed)", ds, int(rows))


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
    if is_glob(path):
        return DatasetFormat.auto  # each matched file by its suffix
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
    files: dict | None = None,
    streaming: bool = False,
    expected_rows: int | None = None,
) -> RowSource:
    """Open a dataset for range reads. ``files``: the launch's record of a many-file
    dataset (``MultiSource.record()``), so a task opens only the files it reads. Raises
    ``DatasetError`` naming the path and the fix."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DatasetError(
            f"dataset.encoding={encoding!r} is not a codec Python knows; use e.g. utf-8, "
            "latin-1, cp1252, utf-16"
        ) from None
    requested = DatasetFormat(fmt)
    if is_file_list(path):
        if requested in (DatasetFormat.hf, DatasetFormat.builtin):
            raise DatasetError(
                f"dataset.path is a list, which dataset.format={requested.value} cannot read; "
                "a list names parquet/jsonl/csv files"
            )
        names = listed_files(list(path), requested)
        return many_files(
            f"{names[0]} .. ({len(names)} files)",
            names,
            requested,
            encoding,
            encoding_errors,
            files,
        )
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
        if streaming:
            return hf_stream_source(path, split, subset, expected_rows, files, cache_dir)
        return hf_source(path, split, subset, cache_dir)
    if is_glob(path):
        return many_files(path, glob_files(path, requested), fmt, encoding, encoding_errors, files)
    if not _exists(path):
        raise DatasetError(
            f"dataset file {path} does not exist; set dataset.path to a parquet/jsonl/csv file, "
            "a directory of them, an fsspec URL, or a Hugging Face dataset name with "
            "dataset.format=hf"
        )
    if is_dir(path):
        return many_files(
            path, dataset_files(path, requested), fmt, encoding, encoding_errors, files
        )
    return _open_file(path, fmt, encoding, encoding_errors)


def many_files(
    description: str,
    names: list[str],
    fmt: DatasetFormat,
    encoding: str,
    encoding_errors: EncodingErrors,
    recorded: dict | None = None,
) -> MultiSource:
    """``names`` read as one dataset. ``recorded`` (``MultiSource.record()`` of the launch,
    for the same files): files are opened only when a read touches them."""

    def opener(f: str) -> RowSource:
        return _open_file(f, suffix_format(f) or fmt, encoding, encoding_errors)

    if recorded and [f for f, _ in recorded["files"]] == names:
        counts = [int(n) for _, n in recorded["files"]]
        return MultiSource(description, names, opener, counts, list(recorded["columns"]))
    return MultiSource(description, names, opener)
