"""The extract tasks.

``extract`` task ``i`` reads rows ``contiguous_range(rows, i, num_tasks)``, turns them into
samples (``lib.extract.samples``), runs the model up to the last requested layer in
batches and hands each batch's activations (non-padding tokens only, flattened in sample
order) to the writer thread (``lib.extract.writer``). The forward pass is the backend's
(``lib.extract.forward``: torch or jax); all the rest is shared. Every shard holds, for
the samples it covers: ``layer_<k>`` (tokens, hidden) per requested hidden state in
``extract.dtype``, ``token_ids``, ``doc_ids``, ``positions`` (tokens,), ``sample_ids``
and ``lengths`` (samples,). After the last shard the task publishes
``extract/task_XXXXX/metadata.json`` (with the backend that ran) and its completion
marker, naming every shard and the metadata with sizes and sha256.

Resume: a task first reads its shards' checkpoint markers in order; it continues after
the last valid one (shards after a gap, and stale markers, are redone). Samples and
batches are pure functions of the rows, so the result is the same as an uninterrupted
run's, bit for bit on CPU.

``extract_metadata`` (one task, after all) checks every task's metadata against its
marker and publishes ``extract/metadata.json`` with the totals.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from omegaconf import DictConfig

from lib.core.errors import DatasetError, UpstreamIncompleteError
from lib.core.markers import (
    CompletionMarker,
    discard_marker,
    require_intact,
    valid_marker,
    write_marker,
)
from lib.core.paths import EXTRACT_DIR, EXTRACT_MERGED_DIR, EXTRACT_METADATA_STAGE, RunPaths
from lib.core.sharding import contiguous_range
from lib.core.storage import OutputFile
from lib.data.columns import open_dataset
from lib.data.datasets import FILES_RECORD_KEY
from lib.extract.checks import check_backend
from lib.extract.forward import open_forward
from lib.extract.model import load_tokenizer, resolve_model
from lib.extract.params import ExtractParams, Packing
from lib.extract.plan import extract_params, planned_rows
from lib.extract.samples import (
    Sample,
    SampleCounts,
    batches,
    pack_samples,
    truncate_samples,
)
from lib.extract.shardfile import ShardBuilder, layer_tensor
from lib.extract.writer import BatchArrays, ShardRecord, ShardWriter
from lib.runtime import stop
from lib.runtime.context import TaskContext
from lib.runtime.ready import mark_ready

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ID_TENSORS = ("token_ids", "doc_ids", "positions", "sample_ids", "lengths")


def tensor_layout(layers: list[int], hidden: int, dtype: str, shuffle: bool) -> dict:
    layout: dict[str, tuple[str, tuple[int, ...], bool]] = {
        layer_tensor(k): (dtype, (hidden,), shuffle) for k in layers
    }
    layout.update(
        {
            "token_ids": ("int32", (), False),
            "doc_ids": ("int64", (), False),
            "positions": ("int32", (), False),
            "sample_ids": ("int64", (), False),
            "lengths": ("int32", (), False),
        }
    )
    return layout


class _Resume:
    """The task's finished shards, from their checkpoint markers: the first ``shards``
    are valid and cover samples ``0..next_position``."""

    def __init__(self, paths: RunPaths, task: int, config_hash: str) -> None:
        storage = paths.storage
        listing = storage.list(paths.extract_task_dir(task) + "/")
        self.records: list[ShardRecord] = []
        i = 0
        while True:
            name = paths.extract_shard_marker(task, i)
            if name not in listing:
                break
            marker = valid_marker(storage, name, config_hash, sizes=listing, on_mismatch="stale")
            if marker is None:
                break
            self.records.append(ShardRecord.from_marker(marker))
            i += 1
        self.shards = i
        self.next_position = self.records[-1].positions[1] if self.records else 0
        # Markers after a gap describe shards of a broken attempt: they are redone.
        for name in listing:
            if name.endswith(".json") and "/shard_" in name:
                idx = int(name.rsplit("shard_", 1)[1].split(".")[0])
                if idx >= i:
                    discard_marker(storage, name)


def _samples(
    cfg: DictConfig,
    p: ExtractParams,
    task: int,
    num_tasks: int,
    rows: int,
    tok,
    counts,
    files: dict | None = None,
):
    source = open_dataset(cfg, files)
    start, stop_ = contiguous_range(rows, task, num_tasks)
    if source.num_rows < stop_:
        raise DatasetError(
            f"{source.description}: has {source.num_rows} rows but this run planned {rows}; "
            "the dataset changed since launch: relaunch with a new run.name"
        )
    n = int(p.max_seq_length)
    if Packing(p.packing) == Packing.pack:
        limit = None
        if p.max_samples is not None:
            a, b = contiguous_range(int(p.max_samples), task, num_tasks)
            limit = b - a
        return pack_samples(cfg, source, tok, (start, stop_), n, counts, task, limit)
    return truncate_samples(cfg, source, tok, (start, stop_), n, counts)


def _batch_arrays(batch: list[Sample], acts: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    arrays = {layer_tensor(k): a for k, a in acts.items()}
    arrays["token_ids"] = np.concatenate([s.token_ids for s in batch])
    arrays["doc_ids"] = np.concatenate([s.doc_ids for s in batch])
    arrays["positions"] = np.concatenate([s.positions for s in batch])
    arrays["sample_ids"] = np.asarray([s.sample_id for s in batch], dtype=np.int64)
    arrays["lengths"] = np.asarray([len(s.token_ids) for s in batch], dtype=np.int32)
    return arrays


def run_extract_task(
    cfg: DictConfig,
    paths: RunPaths,
    *,
    stage: str,
    task: int,
    num_tasks: int,
    rows: int,
    config_hash: str,
    files: dict | None = None,
) -> CompletionMarker:
    """Extract task ``task``'s slice of ``rows`` planned rows and publish its shards,
    metadata and marker. ``files``: the launch's record of a many-file dataset (the task
    then opens only the files of its rows). Raises ``ConfigError`` (layers), ``ModelError``, ``DatasetError``;
    ``StopRequested`` at a batch boundary when the scheduler asks (finished shards kept)."""
    t0 = time.monotonic()
    p = extract_params(cfg)
    check_backend(str(p.backend))
    storage = paths.storage
    storage.clean_temporaries(paths.extract_task_dir(task) + "/")
    source = resolve_model(str(p.model), p.gguf_file)
    tokenizer = load_tokenizer(source, bool(p.trust_remote_code))
    resume = _Resume(paths, task, config_hash)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    forward = open_forward(p, source, int(pad_id))
    mark_ready()  # the multi-host launchers' start phase ends with the model loaded
    layers, hidden, compute = forward.layers, forward.hidden_size, forward.compute_dtype
    dtype, compressed = str(p.dtype), str(p.compression) == "zstd"
    layout = tensor_layout(layers, hidden, dtype, bool(p.byte_shuffle))
    header_meta = {
        "format": f"embedfleet-activations-{FORMAT_VERSION}",
        "model": str(p.model),
        "layers": ",".join(map(str, layers)),
        "dtype": dtype,
        "task": str(task),
    }

    def make_marker(i: int, b: ShardBuilder, positions, ids, output: OutputFile, frames):
        return CompletionMarker(
            stage=stage,
            task=task,
            num_tasks=num_tasks,
            config_hash=config_hash,
            row_range=positions,
            counts={"samples": b.samples, "tokens": b.tokens},
            outputs=[output],
            extra={"sample_ids": list(ids), "frames": {k: f.to_json() for k, f in frames.items()}},
            part=f"shard_{i:05d}",
        )

    progress = {"tokens": 0, "samples": 0, "last": time.monotonic()}
    started = time.monotonic()

    def on_shard(rec: ShardRecord) -> None:
        log.info(
            "task %d: shard %s written (%d samples, %d tokens, %.1f MB)",
            task,
            rec.name.rsplit("/", 1)[-1],
            rec.samples,
            rec.tokens,
            rec.bytes / 1e6,
        )

    writer = ShardWriter(
        storage,
        cap_bytes=int(float(p.shard_size_mb) * 1024 * 1024),
        first_shard=resume.shards,
        new_builder=lambda: ShardBuilder(
            layout,
            compression=str(p.compression),
            level=int(p.compression_level),
            metadata=header_meta,
        ),
        names=lambda i: (
            paths.extract_shard(task, i, compressed),
            paths.extract_shard_marker(task, i),
        ),
        make_marker=make_marker,
        queue_batches=int(p.queue_batches),
        on_shard=on_shard,
    )
    counts = SampleCounts()
    position = 0
    if resume.shards:
        log.info(
            "task %d: %d shard(s) already written (%d samples); continuing after them",
            task,
            resume.shards,
            resume.next_position,
        )
    try:
        samples = _samples(cfg, p, task, num_tasks, rows, tokenizer, counts, files)
        forward_seconds = 0.0
        for batch in batches(
            _skip(samples, resume.next_position), int(p.batch_size), p.max_tokens_per_batch
        ):
            tf = time.monotonic()
            arrays = _batch_arrays(batch, forward(batch))
            forward_seconds += time.monotonic() - tf
            n_tokens = int(arrays["lengths"].sum())
            writer.put(
                BatchArrays(
                    arrays,
                    len(batch),
                    n_tokens,
                    resume.next_position + position,
                    (batch[0].sample_id, batch[-1].sample_id),
                )
            )
            position += len(batch)
            progress["tokens"] += n_tokens
            progress["samples"] += len(batch)
            now = time.monotonic()
            if now - progress["last"] >= float(p.log_every_seconds):
                progress["last"] = now
                rate = progress["tokens"] / max(now - started, 1e-9)
                log.info(
                    "task %d: %d samples, %d tokens, %.0f tokens/s, %d shard(s) written, %.1f MB",
                    task,
                    progress["samples"],
                    progress["tokens"],
                    rate,
                    resume.shards + writer.stats.shards,
                    writer.stats.bytes / 1e6,
                )
            stop.check()  # a safe point: the queued batches are redone if we stop here
        stats = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        forward.close()
    records = [*resume.records, *stats.records]
    if not records:
        raise DatasetError(
            f"extract task {task}: its rows produced no sample (empty texts, or fewer tokens "
            f"than extract.max_seq_length={p.max_seq_length} in pack mode); use fewer tasks "
            "or more data"
        )
    elapsed = time.monotonic() - started
    tokens = sum(r.tokens for r in records)
    samples_total = sum(r.samples for r in records)
    start, stop_ = contiguous_range(rows, task, num_tasks)
    meta = {
        "version": FORMAT_VERSION,
        "task": task,
        "num_tasks": num_tasks,
        "model": str(p.model),
        "model_file": source.describe(),
        "layers": layers,
        "hidden_size": hidden,
        "dtype": dtype,
        "backend": forward.name,
        "compute_dtype": str(compute),
        "packing": str(p.packing),
        "max_seq_length": int(p.max_seq_length),
        "compression": str(p.compression),
        "compression_level": int(p.compression_level) if compressed else None,
        "byte_shuffle": bool(p.byte_shuffle) and compressed,
        "rows": [start, stop_],
        "samples": samples_total,
        "tokens": tokens,
        "bytes": sum(r.bytes for r in records),
        "shards": [r.to_json() for r in records],
        # batches halved after a CUDA out-of-memory error (this attempt of the task)
        "oom_halvings": list(forward.oom_halvings),
    }
    meta_out = storage.publish_json(paths.extract_task_metadata(task), meta)
    outputs = [OutputFile(r.name, r.bytes, r.sha256) for r in records] + [meta_out]
    marker = CompletionMarker(
        stage=stage,
        task=task,
        num_tasks=num_tasks,
        config_hash=config_hash,
        row_range=[start, stop_],
        counts={
            "samples": samples_total,
            "tokens": tokens,
            "shards": len(records),
            "bytes": meta["bytes"],
            "rows_read": counts.rows,
            "skipped_null_text": counts.skipped_null,
            "skipped_empty": counts.skipped_empty,
            "truncated": counts.truncated,
            "dropped_tail_tokens": counts.dropped_tail_tokens,
        },
        outputs=outputs,
        extra={
            "tokens_per_second": progress["tokens"] / max(elapsed, 1e-9),
            "forward_seconds": forward_seconds,
            "write_seconds": stats.write_seconds,
            "resumed_shards": resume.shards,
        },
        wall_seconds=time.monotonic() - t0,
    )
    write_marker(storage, paths.marker(EXTRACT_DIR, task), marker)
    log.info(
        "task %d done: %d samples, %d tokens in %d shard(s), %.1f MB, %.0f tokens/s",
        task,
        samples_total,
        tokens,
        len(records),
        meta["bytes"] / 1e6,
        marker.extra["tokens_per_second"],
    )
    return marker


def _skip(samples, n: int):
    for i, s in enumerate(samples):
        if i >= n:
            yield s


def merge_metadata(
    paths: RunPaths, *, num_tasks: int, stage: str, config_hash: str
) -> CompletionMarker:
    """Check every extract task's metadata against its marker and publish
    ``extract/metadata.json`` (totals, and per task its samples, tokens, bytes, shards).
    Raises ``UpstreamIncompleteError`` naming a task without a marker."""
    storage = paths.storage
    tasks = []
    first: dict[str, Any] | None = None
    for t in range(num_tasks):
        name = paths.marker(EXTRACT_DIR, t)
        meta_name = paths.extract_task_metadata(t)
        if require_intact(storage, name, only=[meta_name]) is None:
            raise UpstreamIncompleteError(
                f"extract_metadata cannot start: {paths.url(name)} does not exist; run the "
                "extract stage first"
            )
        meta = storage.read_json(meta_name)
        first = first or meta
        for key in ("model", "layers", "dtype", "hidden_size", "packing", "max_seq_length"):
            if meta[key] != first[key]:
                raise DatasetError(
                    f"{paths.url(meta_name)}: {key}={meta[key]!r} but task 0 has {first[key]!r}"
                )
        tasks.append(
            {
                "task": t,
                "metadata": meta_name,
                "rows": meta["rows"],
                "samples": meta["samples"],
                "tokens": meta["tokens"],
                "bytes": meta["bytes"],
                "shards": len(meta["shards"]),
            }
        )
    assert first is not None
    merged = {
        "version": FORMAT_VERSION,
        **{
            k: first[k]
            for k in (
                "model",
                "layers",
                "hidden_size",
                "dtype",
                "packing",
                "max_seq_length",
                "compression",
                "byte_shuffle",
            )
        },
        "num_tasks": num_tasks,
        "samples": sum(t["samples"] for t in tasks),
        "tokens": sum(t["tokens"] for t in tasks),
        "bytes": sum(t["bytes"] for t in tasks),
        "shards": sum(t["shards"] for t in tasks),
        "tasks": tasks,
    }
    out = storage.publish_json(paths.extract_metadata, merged)
    marker = CompletionMarker(
        stage=stage,
        task=0,
        num_tasks=1,
        config_hash=config_hash,
        counts={k: merged[k] for k in ("samples", "tokens", "bytes", "shards", "num_tasks")},
        outputs=[out],
    )
    write_marker(storage, paths.marker(EXTRACT_MERGED_DIR, 0), marker)
    return marker


def run(ctx: TaskContext) -> None:
    spec = ctx.spec
    if spec.name == EXTRACT_METADATA_STAGE:
        extract = ctx.plan.stage(spec.depends_on[0])
        merge_metadata(
            ctx.paths, num_tasks=extract.num_tasks, stage=spec.name, config_hash=spec.config_hash
        )
        return
    run_extract_task(
        ctx.cfg,
        ctx.paths,
        stage=spec.name,
        task=ctx.identity.task_index,
        num_tasks=spec.num_tasks,
        rows=planned_rows(ctx.cfg, ctx.plan.dataset_rows),
        config_hash=spec.config_hash,
        files=ctx.plan.extra.get(FILES_RECORD_KEY),
    )
