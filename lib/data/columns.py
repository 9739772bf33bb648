"""A configured dataset as the stages see it: opened, checked against the config (columns,
size) before anything runs, and the columns a task reads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import DictConfig

from lib.core.errors import DatasetError
from lib.core.storage import is_url
from lib.data.datasets import RowSource, open_source
from lib.data.params import TextMode
from lib.data.text import TextDecoding, check_columns, column_texts, required_columns

# A cache shared by every run (the builtin corpus is then extracted once, not once per
# run.root): a local directory that each machine running tasks can write.
ENV_CACHE_DIR = "EMBEDFLEET_CACHE_DIR"


def cache_dir(cfg: DictConfig) -> Path:
    """Where derived datasets (the builtin corpus, a raw-file dataset's Arrow cache) are
    cached: ``$EMBEDFLEET_CACHE_DIR`` when set, else ``run.root/.cache`` on a local root,
    the temp dir when the run lives on an object store."""
    shared = os.environ.get(ENV_CACHE_DIR)
    if shared:
        return Path(shared).expanduser()
    root = str(cfg.run.root)
    if is_url(root):
        return Path(tempfile.gettempdir()) / "embedfleet-cache" / "datasets"
    return Path(root) / ".cache"


def open_dataset(cfg: DictConfig, files: dict | None = None) -> RowSource:
    """The configured dataset; ``files``: the launch's record of a many-file dataset
    (``MultiSource.record()``), so that only the files a read touches are opened."""
    d = cfg.dataset
    return open_source(
        d.path,
        d.format,
        d.split,
        cache_dir=cache_dir(cfg),
        subset=d.subset,
        encoding=d.encoding,
        encoding_errors=d.encoding_errors,
        files=files,
        streaming=bool(d.get("streaming", False)),
        expected_rows=d.expected_rows,
    )


def dataset_rows(source: RowSource, cfg: DictConfig) -> int:
    """Rows the run embeds: the dataset's, or its first ``dataset.limit``."""
    n = source.num_rows
    if cfg.dataset.limit is not None:
        n = min(n, int(cfg.dataset.limit))
    return n


def id_source_fields(cfg: DictConfig, columns: list[str]) -> tuple[str | None, str | None]:
    """The id and source columns: as configured, or ``id``/``source`` when present (auto)."""
    d = cfg.dataset
    id_field = d.id_field if d.id_field is not None else ("id" if "id" in columns else None)
    source_field = (
        d.source_field
        if d.source_field is not None
        else ("source" if "source" in columns else None)
    )
    return id_field or None, source_field or None


def needed_columns(cfg: DictConfig, columns: list[str]) -> list[str]:
    d = cfg.dataset
    cols = list(required_columns(TextMode(d.text_mode), d.text_field, d.template, d.chat))
    for extra in (*id_source_fields(cfg, columns), *d.metadata_fields):
        if extra and extra not in cols:
            cols.append(extra)
    return cols


def check_dataset(source: RowSource, cfg: DictConfig) -> int:
    """Validate columns and size before anything runs; return the number of rows to embed."""
    d = cfg.dataset
    text_key = {
        TextMode.field: "dataset.text_field",
        TextMode.template: "dataset.template",
        TextMode.chat: "dataset.chat.messages_field",
    }[TextMode(d.text_mode)]
    check_columns(
        required_columns(TextMode(d.text_mode), d.text_field, d.template, d.chat),
        source.columns,
        source.description,
        text_key,
    )
    for key in ("id_field", "source_field"):
        if d[key]:  # explicit names must exist; null means auto
            check_columns([d[key]], source.columns, source.description, f"dataset.{key}")
    check_columns(
        list(d.metadata_fields), source.columns, source.description, "dataset.metadata_fields"
    )
    n = dataset_rows(source, cfg)
    if n == 0:
        raise DatasetError(f"{source.description}: the dataset has no rows; nothing to embed")
    if d.expected_rows is not None and source.num_rows != d.expected_rows:
        raise DatasetError(
            f"{source.description}: has {source.num_rows} rows but dataset.expected_rows="
            f"{d.expected_rows}; the dataset changed or the config is for another version"
        )
    if TextMode(d.text_mode) == TextMode.field:
        # The first row, read now: a text column of ints (or of bytes that do not decode)
        # is refused before anything is written; later rows are checked by their task.
        first = source.read(0, 1, [d.text_field])
        dec = TextDecoding(d.encoding, d.encoding_errors, bool(d.cast_text), source.description)
        column_texts(first, d.text_field, dec, text=True)
    if d.unique_ids:
        check_unique_ids(source, cfg, n)
    return n


def duplicate_ids(ids: pa.Array | pa.ChunkedArray) -> tuple[int, dict[str, list[int]]]:
    """(rows whose id an earlier row already has, the first few duplicated ids -> the
    positions of their rows)."""
    counts = pc.value_counts(ids)
    values, n = counts.field("values"), counts.field("counts").to_numpy()
    dup = np.flatnonzero(n > 1)
    if dup.size == 0:
        return 0, {}
    examples: dict[str, list[int]] = {}
    for v in values.take(pa.array(dup[:5])).to_pylist():
        rows = pc.indices_nonzero(pc.equal(ids, pa.scalar(v, ids.type))).to_pylist()
        examples[str(v)] = rows
    return int((n[dup] - 1).sum()), examples


def check_unique_ids(source: RowSource, cfg: DictConfig, rows: int) -> None:
    """``dataset.unique_ids=true``: raise ``DatasetError`` naming the first duplicated id
    and its rows. Without an id column the ids are row indices, unique by construction."""
    id_field, _ = id_source_fields(cfg, source.columns)
    if id_field is None:
        return
    ids = source.read(0, rows, [id_field]).column(0).cast(pa.string())
    count, examples = duplicate_ids(ids)
    if count:
        first, where = next(iter(examples.items()))
        raise DatasetError(
            f"{source.description}: {count} row(s) repeat an earlier id in column "
            f"{id_field!r}; the first: id {first!r} at rows {', '.join(map(str, where[:10]))}. "
            "Make the ids unique, or set dataset.unique_ids=false to allow duplicates "
            "(they are counted in the merge quality report)."
        )
