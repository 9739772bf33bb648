"""The embed stage's task: embed one contiguous row range of the dataset.

Outputs, under ``<run_dir>/embed/shards/`` (published atomically, then the marker):
- ``shard_XXXXX.safetensors``: tensor ``embeddings`` (kept rows, dim), in row order;
- ``shard_XXXXX.parquet``: ``row_index`` (original dataset row), ``id``, ``source`` and the
  configured metadata columns, one row per embedding;
- ``shard_XXXXX.dropped.parquet``: rows not embedded with ``reason`` and ``token_count``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig
from safetensors.numpy import save_file

from lib.config import NullText, TextMode
from lib.datasets import RowSource, open_source
from lib.errors import DatasetError
from lib.fsio import atomic_path, remove_stale_temporaries
from lib.markers import CompletionMarker, describe_outputs, write_marker
from lib.progress import Progress
from lib.sharding import contiguous_range
from lib.text import build_texts, check_columns, required_columns
from lib.token_filter import filter_by_length

log = logging.getLogger(__name__)

STAGE_DIR = "embed"
DROPPED_SCHEMA = pa.schema(
    [
        ("row_index", pa.int64()),
        ("id", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
        ("token_count", pa.int64()),
    ]
)


def shards_dir(run_dir: Path) -> Path:
    return Path(run_dir) / STAGE_DIR / "shards"


def shard_paths(run_dir: Path, task: int) -> dict[str, Path]:
    base = shards_dir(run_dir) / f"shard_{task:05d}"
    return {
        "embeddings": base.with_suffix(".safetensors"),
        "metadata": base.with_suffix(".parquet"),
        "dropped": base.with_name(base.name + ".dropped.parquet"),
    }


def open_dataset(cfg: DictConfig) -> RowSource:
    d = cfg.dataset
    return open_source(
        d.path, d.format, d.split, cache_dir=Path(cfg.run.root) / ".cache", subset=d.subset
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
    cols = required_columns(TextMode(d.text_mode), d.text_field, d.template, d.chat)
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
    return n


@dataclass
class ShardResult:
    marker: CompletionMarker
    rows_per_second: float


def _string_column(table: pa.Table, name: str | None, fallback: list[str]) -> list[str]:
    if not name:
        return fallback
    return [
        fb if v is None else str(v)
        for v, fb in zip(table.column(name).to_pylist(), fallback, strict=True)
    ]


def run_embed_shard(
    cfg: DictConfig, task: int, num_tasks: int, total_rows: int, config_hash: str, run_dir: Path
) -> ShardResult:
    """Embed rows ``contiguous_range(total_rows, task, num_tasks)`` and publish the shard."""
    from lib.embedders import load_embedder

    t0 = time.monotonic()
    start, stop = contiguous_range(total_rows, task, num_tasks)
    paths = shard_paths(run_dir, task)
    remove_stale_temporaries(shards_dir(run_dir))
    source = open_dataset(cfg)
    if source.num_rows < stop:
        raise DatasetError(
            f"{source.description}: has {source.num_rows} rows but this run planned {total_rows}; "
            "the dataset changed since launch: relaunch with a new run.name"
        )
    d = cfg.dataset
    table = source.read(start, stop, needed_columns(cfg, source.columns))
    row_index = np.arange(start, stop, dtype=np.int64)
    id_field, source_field = id_source_fields(cfg, source.columns)
    ids = _string_column(table, id_field, [str(i) for i in row_index])
    sources = _string_column(table, source_field, [d.name] * len(row_index))
    texts = build_texts(
        table, TextMode(d.text_mode), d.text_field, d.template, d.chat, cfg.model.document_prefix
    )

    null_rows = [i for i, t in enumerate(texts) if t is None]
    if null_rows and NullText(d.on_null_text) == NullText.error:
        shown = ", ".join(f"row {start + i} (id {ids[i]})" for i in null_rows[:10])
        more = f" and {len(null_rows) - 10} more" if len(null_rows) > 10 else ""
        raise DatasetError(
            f"{source.description}: {len(null_rows)} row(s) have no text: {shown}{more}. "
            "Fix the data, or set dataset.on_null_text=drop to skip them (they are recorded "
            "in the dropped-rows file)."
        )
    candidates = [i for i, t in enumerate(texts) if t is not None]

    embedder = load_embedder(cfg.model, cfg.embed)
    log.info(
        "task %d/%d: rows %d..%d (%d rows) with %s",
        task,
        num_tasks,
        start,
        stop,
        stop - start,
        embedder.description,
    )
    filt = filter_by_length(
        embedder.tokenizer,
        [texts[i] for i in candidates],
        int(cfg.model.max_length),
        int(cfg.embed.tokenize_batch_size),
    )
    kept = [candidates[i] for i in filt.kept]
    dropped = [candidates[i] for i in filt.dropped]
    if dropped:
        log.info(
            "task %d: dropped %d row(s) longer than model.max_length=%d tokens",
            task,
            len(dropped),
            cfg.model.max_length,
        )

    progress = Progress(len(kept), f"embed task {task}", log, cfg.embed.log_every_seconds)
    embeddings = embedder.embed(filt.token_ids, on_batch=progress.update)
    progress.close()
    embed_seconds = progress.elapsed
    embeddings = embeddings.astype(cfg.embed.output_dtype, copy=False)

    kept_arr = np.asarray(kept, dtype=np.int64)
    meta_cols = {
        "row_index": pa.array(row_index[kept_arr] if kept else [], pa.int64()),
        "id": pa.array([ids[i] for i in kept], pa.string()),
        "source": pa.array([sources[i] for i in kept], pa.string()),
    }
    for name in d.metadata_fields:
        meta_cols[name] = table.column(name).take(pa.array(kept, pa.int64()))
    metadata = pa.table(meta_cols)
    dropped_table = pa.table(
        {
            "row_index": [int(row_index[i]) for i in null_rows + dropped],
            "id": [ids[i] for i in null_rows + dropped],
            "source": [sources[i] for i in null_rows + dropped],
            "reason": ["null_text"] * len(null_rows) + ["too_long"] * len(dropped),
            "token_count": [None] * len(null_rows) + filt.dropped_token_counts,
        },
        schema=DROPPED_SCHEMA,
    )

    with atomic_path(paths["embeddings"]) as tmp:
        save_file(
            {"embeddings": np.ascontiguousarray(embeddings)},
            str(tmp),
            metadata={"row_start": str(start), "row_stop": str(stop), "task": str(task)},
        )
    with atomic_path(paths["metadata"]) as tmp:
        pq.write_table(metadata, tmp)
    with atomic_path(paths["dropped"]) as tmp:
        pq.write_table(dropped_table, tmp)

    wall = time.monotonic() - t0
    marker = CompletionMarker(
        stage=STAGE_DIR,
        task=task,
        num_tasks=num_tasks,
        config_hash=config_hash,
        row_range=[start, stop],
        counts={
            "rows": stop - start,
            "embedded": len(kept),
            "dropped_too_long": len(dropped),
            "dropped_null_text": len(null_rows),
            "tokens": filt.kept_tokens,
            "dim": int(embeddings.shape[1]),
        },
        outputs=describe_outputs(run_dir, paths.values()),
        extra={"dtype": str(embeddings.dtype), "backend": embedder.description},
        wall_seconds=wall,
    )
    write_marker(run_dir, STAGE_DIR, marker)
    rate = len(kept) / max(embed_seconds, 1e-9)
    log.info(
        "task %d done: %d rows embedded, %d dropped, %.1f rows/s (%.0f tokens/s), %.1fs wall",
        task,
        len(kept),
        len(dropped) + len(null_rows),
        rate,
        filt.kept_tokens / max(embed_seconds, 1e-9),
        wall,
    )
    return ShardResult(marker, rate)
