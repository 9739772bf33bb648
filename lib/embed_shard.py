"""The embed stage's task: embed one contiguous row range of the dataset.

Outputs, under ``<run_dir>/embed/shards/`` (published atomically, then the marker):
- ``shard_XXXXX.safetensors``: tensor ``embeddings`` (kept rows, dim), in row order;
- ``shard_XXXXX.parquet``: ``row_index`` (original dataset row), ``id``, ``source`` and the
  configured metadata columns, one row per embedding;
- ``shard_XXXXX.dropped.parquet``: rows not embedded with ``reason`` and ``token_count``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig
from safetensors.numpy import save_file

from lib import preempt
from lib.config import NullText, TextMode
from lib.datasets import RowSource, open_source
from lib.errors import DatasetError
from lib.fsio import atomic_path, atomic_write_json, remove_stale_temporaries
from lib.markers import CompletionMarker, describe_outputs, write_marker
from lib.progress import Progress
from lib.sharding import contiguous_range
from lib.stream_writers import MatrixWriter
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
    values = table.column(name).to_pylist()
    return [fb if v is None else str(v) for v, fb in zip(values, fallback, strict=True)]


def parts_dir(run_dir: Path, task: int) -> Path:
    return shards_dir(run_dir).parent / "parts" / f"shard_{task:05d}"


def part_ranges(start: int, stop: int, part_rows: int) -> list[tuple[int, int]]:
    """Deterministic row parts of a shard: the same whether or not the task was stopped."""
    if part_rows < 1:
        raise ValueError(f"embed.part_rows must be >= 1, got {part_rows}")
    return [(a, min(a + part_rows, stop)) for a in range(start, stop, part_rows)] or [(start, stop)]


@dataclass
class PartOutput:
    embeddings: Path
    metadata: Path
    dropped: Path
    marker: Path

    @classmethod
    def at(cls, run_dir: Path, task: int, part: int) -> PartOutput:
        base = parts_dir(run_dir, task) / f"part_{part:05d}"
        return cls(
            base.with_suffix(".safetensors"),
            base.with_suffix(".parquet"),
            base.with_name(base.name + ".dropped.parquet"),
            base.with_suffix(".json"),
        )

    def files(self) -> list[Path]:
        return [self.embeddings, self.metadata, self.dropped]

    def valid(self, config_hash: str, row_range: tuple[int, int]) -> bool:
        """A part counts only if its marker matches this config and its files are whole."""
        try:
            meta = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return False
        if meta.get("config_hash") != config_hash or meta.get("row_range") != list(row_range):
            return False
        sizes = meta.get("bytes", {})
        return all(f.exists() and f.stat().st_size == sizes.get(f.name) for f in self.files())


class _PartEmbedder:
    """Loads the model on first use: a task whose parts are all done needs none."""

    def __init__(self, cfg: DictConfig, task: int, num_tasks: int) -> None:
        self.cfg, self.task, self.num_tasks = cfg, task, num_tasks
        self._embedder = None

    def get(self):
        if self._embedder is None:
            from lib.embedders import load_embedder

            self._embedder = load_embedder(self.cfg.model, self.cfg.embed)
        return self._embedder

    def close(self) -> None:
        """Release the backend's resources (vLLM's engine processes) once all parts are done."""
        close = getattr(self._embedder, "close", None)
        if close is not None:
            close()
        self._embedder = None


def _embed_part(
    cfg: DictConfig,
    source: RowSource,
    row_range: tuple[int, int],
    lazy: _PartEmbedder,
    progress: Progress,
    out: PartOutput,
    config_hash: str,
) -> dict[str, int]:
    """Embed one part and publish its files, then its marker. Returns its counts."""
    d = cfg.dataset
    start, stop = row_range
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
    embedder = lazy.get()
    filt = filter_by_length(
        embedder.tokenizer,
        [texts[i] for i in candidates],
        int(cfg.model.max_length),
        int(cfg.embed.tokenize_batch_size),
    )
    kept = [candidates[i] for i in filt.kept]
    dropped = [candidates[i] for i in filt.dropped]
    progress.total -= len(null_rows) + len(dropped)
    embeddings = embedder.embed(filt.token_ids, on_batch=progress.update)
    embeddings = np.ascontiguousarray(embeddings.astype(cfg.embed.output_dtype, copy=False))

    meta_cols = {
        "row_index": pa.array(row_index[np.asarray(kept, dtype=np.int64)], pa.int64()),
        "id": pa.array([ids[i] for i in kept], pa.string()),
        "source": pa.array([sources[i] for i in kept], pa.string()),
    }
    for name in d.metadata_fields:
        meta_cols[name] = table.column(name).take(pa.array(kept, pa.int64()))
    lost = null_rows + dropped
    dropped_table = pa.table(
        {
            "row_index": [int(row_index[i]) for i in lost],
            "id": [ids[i] for i in lost],
            "source": [sources[i] for i in lost],
            "reason": ["null_text"] * len(null_rows) + ["too_long"] * len(dropped),
            "token_count": [None] * len(null_rows) + filt.dropped_token_counts,
        },
        schema=DROPPED_SCHEMA,
    )
    with atomic_path(out.embeddings) as tmp:
        save_file({"embeddings": embeddings}, str(tmp))
    with atomic_path(out.metadata) as tmp:
        pq.write_table(pa.table(meta_cols), tmp)
    with atomic_path(out.dropped) as tmp:
        pq.write_table(dropped_table, tmp)
    counts = {
        "rows": stop - start,
        "embedded": len(kept),
        "dropped_too_long": len(dropped),
        "dropped_null_text": len(null_rows),
        "tokens": filt.kept_tokens,
        "dim": int(embedder.dim),
    }
    atomic_write_json(
        out.marker,
        {
            "config_hash": config_hash,
            "row_range": [start, stop],
            "counts": counts,
            "bytes": {f.name: f.stat().st_size for f in out.files()},
        },
    )
    return counts


def _assemble(
    parts: list[PartOutput], paths: dict[str, Path], start: int, stop: int, task: int, dtype: str
) -> str:
    """Stream the parts into the shard's files; return the embeddings' sha256."""
    from safetensors import safe_open

    shapes = []
    for p in parts:
        with safe_open(str(p.embeddings), "np") as f:
            shapes.append(f.get_slice("embeddings").get_shape())
    dim = shapes[0][1]
    writer = MatrixWriter(
        paths["embeddings"],
        sum(s[0] for s in shapes),
        dim,
        dtype,
        metadata={"row_start": str(start), "row_stop": str(stop), "task": str(task)},
    )
    try:
        for p in parts:
            with safe_open(str(p.embeddings), "np") as f:
                writer.write(f.get_tensor("embeddings").reshape(-1, dim))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    for key, attr in (("metadata", "metadata"), ("dropped", "dropped")):
        tables = [pq.read_table(getattr(p, attr)) for p in parts]
        with atomic_path(paths[key]) as tmp:
            pq.write_table(pa.concat_tables(tables), tmp)
    assert writer.sha256 is not None
    return writer.sha256


def run_embed_shard(
    cfg: DictConfig, task: int, num_tasks: int, total_rows: int, config_hash: str, run_dir: Path
) -> ShardResult:
    """Embed rows ``contiguous_range(total_rows, task, num_tasks)`` and publish the shard.

    Works part by part (``embed.part_rows``); finished parts survive a stop and are reused.
    Raises ``StopRequested`` at a part boundary when the scheduler asked us to stop.
    """
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
    ranges = part_ranges(start, stop, int(cfg.embed.part_rows))
    parts = [PartOutput.at(run_dir, task, i) for i in range(len(ranges))]
    pdir = parts_dir(run_dir, task)
    remove_stale_temporaries(pdir)
    done = [p.valid(config_hash, r) for p, r in zip(parts, ranges, strict=True)]
    lazy = _PartEmbedder(cfg, task, num_tasks)
    todo_rows = sum(b - a for (a, b), ok in zip(ranges, done, strict=True) if not ok)
    log.info(
        "task %d/%d: rows %d..%d (%d rows) in %d part(s)%s",
        task,
        num_tasks,
        start,
        stop,
        stop - start,
        len(ranges),
        f", {sum(done)} already done" if any(done) else "",
    )
    progress = Progress(todo_rows, f"embed task {task}", log, cfg.embed.log_every_seconds)
    tokens = 0
    for part, row_range, ok in zip(parts, ranges, done, strict=True):
        if ok:
            continue
        counts = _embed_part(cfg, source, row_range, lazy, progress, part, config_hash)
        tokens += counts["tokens"]
        preempt.check()  # a safe point: this part is published
    progress.close()
    lazy.close()
    embed_seconds = progress.elapsed

    counts: dict[str, int] = {}
    for part in parts:
        for k, v in json.loads(part.marker.read_text())["counts"].items():
            counts[k] = v if k == "dim" else counts.get(k, 0) + v
    sha = _assemble(parts, paths, start, stop, task, cfg.embed.output_dtype)
    wall = time.monotonic() - t0
    marker = CompletionMarker(
        stage=STAGE_DIR,
        task=task,
        num_tasks=num_tasks,
        config_hash=config_hash,
        row_range=[start, stop],
        counts=counts,
        outputs=describe_outputs(run_dir, paths.values(), known={paths["embeddings"].name: sha}),
        extra={"dtype": cfg.embed.output_dtype, "parts": len(parts)},
        wall_seconds=wall,
    )
    write_marker(run_dir, STAGE_DIR, marker)
    shutil.rmtree(pdir, ignore_errors=True)  # the shard now holds every part
    rate = progress.done / max(embed_seconds, 1e-9)
    log.info(
        "task %d done: %d rows embedded, %d dropped, %.1f rows/s (%.0f tokens/s), %.1fs wall",
        task,
        counts["embedded"],
        counts["dropped_too_long"] + counts["dropped_null_text"],
        rate,
        tokens / max(embed_seconds, 1e-9),
        wall,
    )
    return ShardResult(marker, rate)
