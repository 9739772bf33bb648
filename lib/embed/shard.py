"""The embed stage's task: embed one contiguous row range of the dataset into one shard.

Outputs (``lib.core.paths``: ``embed/shards/shard_XXXXX.*``), published whole, then the
task's completion marker:

- ``.safetensors``: tensor ``embeddings`` (kept rows, dim), in row order;
- ``.parquet``: ``row_index`` (original dataset row), ``id``, ``source``, the configured
  metadata columns and (``dataset.keep_text``) the text: ``text``, or a chat's
  ``user_prompt``, ``think_text``, ``response_text``, ``num_turns``; one row per embedding;
- ``.dropped.parquet``: rows not embedded, with ``reason`` (``null_text``, ``empty``,
  ``too_long``) and ``token_count``.

A shard (or part) whose rows are all dropped is valid: its files hold 0 rows, and its
marker is published like any other.

A shard is embedded part by part (``embed.part_rows``); each part's files and its marker
(the same marker contract, ``part: part_XXXXX``) are published as it finishes, so a
stopped or killed task resumes from its last finished part. The finished shard replaces
the parts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig
from safetensors.numpy import load as load_safetensors

from lib.core.errors import DatasetError
from lib.core.markers import CompletionMarker, discard_marker, valid_marker, write_marker
from lib.core.paths import RunPaths, ShardFiles
from lib.core.progress import Progress
from lib.core.sharding import contiguous_range
from lib.core.storage import OutputFile, Storage
from lib.data.columns import id_source_fields, needed_columns, open_dataset
from lib.data.datasets import RowSource
from lib.data.params import NullText, TextMode
from lib.data.text import ChatParts, TextDecoding, build_chat_parts, build_texts, column_texts
from lib.embed.sample import read_sample
from lib.embed.token_filter import filter_by_length
from lib.formats.matrix_writer import MatrixWriter
from lib.formats.parquet import DROPPED_SCHEMA, publish_table, read_table
from lib.runtime import stop
from lib.runtime.ready import mark_ready

log = logging.getLogger(__name__)


@dataclass
class ShardResult:
    marker: CompletionMarker
    rows_per_second: float


@dataclass(frozen=True)
class ShardTask:
    """Which shard this is: the run dir, the stage, the task, its rows and the stage hash."""

    paths: RunPaths
    stage: str
    stage_dir: str
    task: int
    num_tasks: int
    total_rows: int
    config_hash: str
    # Each task's [start, stop) when the plan fixes them (a run grown by embed.append);
    # None: contiguous_range(total_rows, task, num_tasks).
    ranges: tuple[tuple[int, int], ...] | None = None
    # The run embeds a sample (embed/sample.parquet): positions 0..total_rows map to
    # the dataset rows it lists.
    sampled: bool = False
    # The launch's record of a many-file dataset (MultiSource.record()).
    files: dict | None = None

    def row_range(self) -> tuple[int, int]:
        if self.ranges is not None:
            a, b = self.ranges[self.task]
            return int(a), int(b)
        return contiguous_range(self.total_rows, self.task, self.num_tasks)

    @property
    def storage(self) -> Storage:
        return self.paths.storage


def _string_column(
    table: pa.Table, name: str | None, fallback: list[str], dec: TextDecoding
) -> list[str]:
    if not name:
        return fallback
    values = column_texts(table, name, dec, text=False)  # bytes decoded, never str(b"..")
    return [fb if v is None else str(v) for v, fb in zip(values, fallback, strict=True)]


def part_ranges(start: int, stop_: int, part_rows: int) -> list[tuple[int, int]]:
    """Deterministic row parts of a shard: the same whether or not the task was stopped."""
    if part_rows < 1:
        raise ValueError(f"embed.part_rows must be >= 1, got {part_rows}")
    return [(a, min(a + part_rows, stop_)) for a in range(start, stop_, part_rows)] or [
        (start, stop_)
    ]


class _LazyEmbedder:
    """Loads the model on first use: a task whose parts are all done needs none."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self._embedder = None

    def get(self):
        if self._embedder is None:
            from lib.embed.backends import load_embedder

            self._embedder = load_embedder(self.cfg.model, self.cfg.embed)
            mark_ready()  # the multi-host launchers' start phase ends here
        return self._embedder

    def close(self) -> None:
        """Release the backend's resources (vLLM's engine processes) once all parts are done."""
        close = getattr(self._embedder, "close", None)
        if close is not None:
            close()
        self._embedder = None


def _publish_shard_files(
    storage: Storage,
    files: ShardFiles,
    embeddings: np.ndarray,
    metadata: pa.Table,
    dropped: pa.Table,
) -> list[OutputFile]:
    rows, dim = embeddings.shape
    with storage.publish(files.embeddings, digest=False) as staged:
        # Our writer, not safetensors' save_file: it also writes a (0, dim) matrix.
        writer = MatrixWriter(staged.path, rows, dim, str(embeddings.dtype), name=files.embeddings)
        try:
            writer.write(embeddings)
            staged.sha256 = writer.close()
        except BaseException:
            writer.abort()
            raise
    assert staged.output is not None
    return [
        staged.output,
        publish_table(storage, files.metadata, metadata),
        publish_table(storage, files.dropped, dropped),
    ]


def text_columns(
    texts: list[str | None], parts: list[ChatParts | None] | None, kept: list[int]
) -> dict[str, pa.Array]:
    """``dataset.keep_text``'s metadata columns for the ``kept`` rows: ``user_prompt``,
    ``think_text``, ``response_text`` and ``num_turns`` of a chat (``parts``), else
    ``text``, the row's text as embedded (before ``model.document_prefix``)."""
    if parts is None:
        return {"text": pa.array([texts[i] for i in kept], pa.string())}
    rows = [parts[i] for i in kept]  # kept rows have text, hence parts
    return {
        "user_prompt": pa.array([p.user_prompt for p in rows], pa.string()),
        "think_text": pa.array([p.think_text for p in rows], pa.string()),
        "response_text": pa.array([p.response_text for p in rows], pa.string()),
        "num_turns": pa.array([p.num_turns for p in rows], pa.int32()),
    }


def _embed_part(
    cfg: DictConfig,
    shard: ShardTask,
    source: RowSource,
    part: int,
    row_range: tuple[int, int],
    lazy: _LazyEmbedder,
    progress: Progress,
    sample: np.ndarray | None = None,
) -> CompletionMarker:
    """Embed one part (positions ``row_range``; of ``sample`` when the run embeds one)
    and publish its files, then its marker."""
    d = cfg.dataset
    start, stop_ = row_range
    columns = needed_columns(cfg, source.columns)
    if sample is None:
        table = source.read(start, stop_, columns)
        row_index = np.arange(start, stop_, dtype=np.int64)
        dec = TextDecoding(
            d.encoding, d.encoding_errors, bool(d.cast_text), source.description, start
        )
    else:  # positions start..stop of the sample: its dataset rows
        row_index = sample[start:stop_]
        table = source.take(row_index, columns)
        dec = TextDecoding(
            d.encoding,
            d.encoding_errors,
            bool(d.cast_text),
            source.description,
            int(row_index[0]) if len(row_index) else 0,
            tuple(int(r) for r in row_index),
        )
    id_field, source_field = id_source_fields(cfg, source.columns)
    ids = _string_column(table, id_field, [str(i) for i in row_index], dec)
    sources = _string_column(table, source_field, [d.name] * len(row_index), dec)
    mode = TextMode(d.text_mode)
    parts = build_chat_parts(table, d.chat, dec) if mode == TextMode.chat else None
    if parts is not None:
        texts = [None if p is None else p.text(d.chat) for p in parts]
    else:
        texts = build_texts(table, mode, d.text_field, d.template, d.chat, "", dec)
    null_rows = [i for i, t in enumerate(texts) if t is None]
    if null_rows and NullText(d.on_null_text) == NullText.error:
        shown = ", ".join(f"row {int(row_index[i])} (id {ids[i]})" for i in null_rows[:10])
        more = f" and {len(null_rows) - 10} more" if len(null_rows) > 10 else ""
        raise DatasetError(
            f"{source.description}: {len(null_rows)} row(s) have no text: {shown}{more}. "
            "Fix the data, or set dataset.on_null_text=drop to skip them (they are recorded "
            "in the dropped-rows file)."
        )
    # An empty text would embed to the same vector everywhere: dropped, recorded.
    empty_rows = (
        [i for i, t in enumerate(texts) if t is not None and not t.strip()]
        if d.drop_empty_text
        else []
    )
    skip = set(null_rows) | set(empty_rows)
    prefix = cfg.model.document_prefix
    candidates = [i for i in range(len(texts)) if i not in skip]
    embedder = lazy.get()
    filt = filter_by_length(
        embedder.tokenizer,
        [prefix + texts[i] for i in candidates],
        int(cfg.model.max_length),
        int(cfg.embed.tokenize_batch_size),
    )
    kept = [candidates[i] for i in filt.kept]
    dropped = [candidates[i] for i in filt.dropped]
    progress.total -= len(null_rows) + len(empty_rows) + len(dropped)
    if filt.token_ids:
        embeddings = embedder.embed(filt.token_ids, on_batch=progress.update)
    else:  # every row dropped: an empty part, not a call into the backend
        embeddings = np.empty((0, int(embedder.dim)), dtype=np.float32)
    embeddings = np.ascontiguousarray(
        embeddings.astype(cfg.embed.output_dtype, copy=False).reshape(-1, int(embedder.dim))
    )

    meta_cols = {
        "row_index": pa.array(row_index[np.asarray(kept, dtype=np.int64)], pa.int64()),
        "id": pa.array([ids[i] for i in kept], pa.string()),
        "source": pa.array([sources[i] for i in kept], pa.string()),
    }
    for name in d.metadata_fields:
        meta_cols[name] = table.column(name).take(pa.array(kept, pa.int64()))
    if d.keep_text:
        for name, values in text_columns(texts, parts, kept).items():
            meta_cols.setdefault(name, values)  # a metadata_fields column of that name wins
    reasons = {i: ("null_text", None) for i in null_rows}
    reasons.update({i: ("empty", None) for i in empty_rows})
    reasons.update(
        {i: ("too_long", n) for i, n in zip(dropped, filt.dropped_token_counts, strict=True)}
    )
    lost = sorted(reasons)
    dropped_table = pa.table(
        {
            "row_index": [int(row_index[i]) for i in lost],
            "id": [ids[i] for i in lost],
            "source": [sources[i] for i in lost],
            "reason": [reasons[i][0] for i in lost],
            "token_count": [reasons[i][1] for i in lost],
        },
        schema=DROPPED_SCHEMA,
    )
    paths = shard.paths
    # A stale marker of an earlier, broken attempt goes before its files are rewritten.
    discard_marker(shard.storage, paths.embed_part_marker(shard.task, part))
    outputs = _publish_shard_files(
        shard.storage,
        paths.embed_part(shard.task, part),
        embeddings,
        pa.table(meta_cols),
        dropped_table,
    )
    marker = CompletionMarker(
        stage=shard.stage,
        task=shard.task,
        num_tasks=shard.num_tasks,
        config_hash=shard.config_hash,
        row_range=[start, stop_],
        counts={
            "rows": stop_ - start,
            "embedded": len(kept),
            "dropped_too_long": len(dropped),
            "dropped_null_text": len(null_rows),
            "dropped_empty": len(empty_rows),
            "tokens": filt.kept_tokens,
            "dim": int(embedder.dim),
        },
        outputs=outputs,
        part=paths.part_name(part),
    )
    write_marker(shard.storage, paths.embed_part_marker(shard.task, part), marker)
    return marker


def _assemble(shard: ShardTask, parts: list[CompletionMarker], dtype: str) -> list[OutputFile]:
    """Stream the parts into the shard's files; return them as published outputs."""
    storage, paths, task = shard.storage, shard.paths, shard.task
    files = paths.embed_shard(task)
    part_files = [paths.embed_part(task, i) for i in range(len(parts))]
    rows = sum(int(m.counts["embedded"]) for m in parts)
    dim = int(parts[0].counts["dim"])
    start, stop_ = parts[0].row_range[0], parts[-1].row_range[1]
    with storage.publish(files.embeddings, digest=False) as staged:
        writer = MatrixWriter(
            staged.path,
            rows,
            dim,
            dtype,
            name=files.embeddings,
            metadata={"row_start": str(start), "row_stop": str(stop_), "task": str(task)},
        )
        try:
            for pf in part_files:
                part = load_safetensors(storage.read_bytes(pf.embeddings))["embeddings"]
                writer.write(part.reshape(-1, dim))
            staged.sha256 = writer.close()
        except BaseException:
            writer.abort()
            raise
    assert staged.output is not None
    outputs = [staged.output]
    for attr in ("metadata", "dropped"):
        tables = [read_table(storage, getattr(pf, attr)) for pf in part_files]
        outputs.append(publish_table(storage, getattr(files, attr), pa.concat_tables(tables)))
    return outputs


def run_embed_shard(cfg: DictConfig, shard: ShardTask) -> ShardResult:
    """Embed the task's rows (``ShardTask.row_range``) and publish the shard.

    Works part by part (``embed.part_rows``); finished parts survive a stop and are reused.
    Raises ``StopRequested`` at a part boundary when the scheduler asked us to stop,
    ``DatasetError`` for a bad row or a dataset that changed since launch.
    """
    t0 = time.monotonic()
    storage, paths, task = shard.storage, shard.paths, shard.task
    start, stop_ = shard.row_range()
    # Only this task's: sibling tasks may be publishing into embed/shards/ right now.
    storage.clean_temporaries(paths.embed_shard_prefix(task))
    source = open_dataset(cfg, shard.files)
    sample = read_sample(storage, paths, shard.total_rows) if shard.sampled else None
    needed = stop_ if sample is None else int(sample[stop_ - 1]) + 1
    if source.num_rows < needed:
        raise DatasetError(
            f"{source.description}: has {source.num_rows} rows but this run planned "
            f"{shard.total_rows}; the dataset changed since launch: relaunch with a new run.name"
        )
    ranges = part_ranges(start, stop_, int(cfg.embed.part_rows))
    parts_dir = paths.embed_parts(task)
    storage.remove_stale_temporaries(parts_dir)
    sizes = storage.list(parts_dir)
    blobs = storage.read_many(
        [n for i in range(len(ranges)) if (n := paths.embed_part_marker(task, i)) in sizes]
    )
    done: list[CompletionMarker | None] = []
    for i, row_range in enumerate(ranges):
        name = paths.embed_part_marker(task, i)
        marker = None
        if name in blobs:
            marker = valid_marker(
                storage, name, shard.config_hash, sizes=sizes, blob=blobs[name], on_mismatch="stale"
            )
        if marker is not None and marker.row_range != list(row_range):
            marker = None
        done.append(marker)
    lazy = _LazyEmbedder(cfg)
    todo_rows = sum(b - a for (a, b), m in zip(ranges, done, strict=True) if m is None)
    n_done = sum(m is not None for m in done)
    log.info(
        "task %d/%d: rows %d..%d (%d rows) in %d part(s)%s",
        task,
        shard.num_tasks,
        start,
        stop_,
        stop_ - start,
        len(ranges),
        f", {n_done} already done" if n_done else "",
    )
    progress = Progress(todo_rows, f"embed task {task}", log, cfg.embed.log_every_seconds)
    tokens = 0
    for i, row_range in enumerate(ranges):
        if done[i] is not None:
            continue
        done[i] = _embed_part(cfg, shard, source, i, row_range, lazy, progress, sample)
        tokens += done[i].counts["tokens"]
        stop.check()  # a safe point: this part is published
    progress.close()
    lazy.close()
    embed_seconds = progress.elapsed

    parts = [m for m in done if m is not None]
    counts: dict[str, int] = {}
    for part in parts:
        for k, v in part.counts.items():
            counts[k] = v if k == "dim" else counts.get(k, 0) + v
    outputs = _assemble(shard, parts, cfg.embed.output_dtype)
    wall = time.monotonic() - t0
    marker = CompletionMarker(
        stage=shard.stage,
        task=task,
        num_tasks=shard.num_tasks,
        config_hash=shard.config_hash,
        row_range=[start, stop_],
        counts=counts,
        outputs=outputs,
        extra={"dtype": cfg.embed.output_dtype, "parts": len(parts)},
        wall_seconds=wall,
    )
    write_marker(storage, paths.marker(shard.stage_dir, task), marker)
    storage.remove_tree(parts_dir)  # the shard now holds every part
    rate = progress.done / max(embed_seconds, 1e-9)
    log.info(
        "task %d done: %d rows embedded, %d dropped, %.1f rows/s (%.0f tokens/s), %.1fs wall",
        task,
        counts["embedded"],
        counts["dropped_too_long"] + counts["dropped_null_text"] + counts.get("dropped_empty", 0),
        rate,
        tokens / max(embed_seconds, 1e-9),
        wall,
    )
    return ShardResult(marker, rate)
