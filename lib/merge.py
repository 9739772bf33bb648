"""The merge stage: validate every shard, then stream them into one matrix.

Validation happens before any output is written: every shard present, row ranges tiling
``0..N`` with no gap or overlap (each offending shard named), files the size their marker
recorded, one dimension and dtype everywhere. The streaming pass then checks each row for
NaN/Inf (reporting original row indices) and the shard's sha256 while copying into
temporary files; any problem removes them, so nothing is left that looks complete.

Peak memory is one chunk (``merge.chunk_rows`` rows, capped at ``CHUNK_BYTES``), whatever
the total. Outputs under ``<run_dir>/merge/``: ``embeddings.safetensors`` and/or
``embeddings.npy``, ``metadata.parquet``, ``dropped_rows.parquet``, ``quality_report.json``,
``by_source/<source>/{embeddings.safetensors, metadata.parquet}``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import DictConfig

from lib.arrays import ArrayFormatError, open_embeddings, safetensors_header
from lib.config import MergeFormat, MergeInput
from lib.embed_shard import DROPPED_SCHEMA, shard_paths
from lib.errors import ShardValidationError
from lib.fsio import atomic_path, atomic_write_json
from lib.markers import (
    CompletionMarker,
    InvalidMarkerError,
    describe_outputs,
    marker_path,
    read_marker,
    write_marker,
)
from lib.pipeline import StageSpec
from lib.sharding import compress_indices
from lib.stream_writers import MatrixWriter

log = logging.getLogger(__name__)

STAGE_DIR = "merge"
# Small enough that a block stays in cache while it is read, checked, hashed twice and
# written (32 MiB blocks made every pass stream from DRAM: 2x slower end to end).
CHUNK_BYTES = 4 << 20
_ST_NUMPY = {"F32": "float32", "F16": "float16", "F64": "float64"}


@dataclass
class ShardInput:
    """One shard as the merge sees it (from an embed marker or a legacy pickle)."""

    task: int
    row_start: int
    row_stop: int
    rows: int  # embedded rows (<= row_stop - row_start; the rest were dropped)
    dim: int
    dtype: str
    label: str  # for messages: file name
    embeddings_path: Path | None = None
    data_offset: int = 0  # byte offset of the tensor data in the file
    metadata_path: Path | None = None
    dropped_path: Path | None = None
    sha256: str | None = None  # expected sha256 of embeddings_path
    array: np.ndarray | None = None  # legacy shards arrive in memory
    source_files: list[str] = field(default_factory=list)


def _chunk_rows(dim: int, itemsize: int, limit: int) -> int:
    return max(1, min(limit, CHUNK_BYTES // max(1, dim * itemsize)))


# ---------------------------------------------------------------------------------------
# Collecting inputs


def collect_embed_shards(run_dir: Path, embed: StageSpec) -> list[ShardInput]:
    """Read every embed marker and shard header. Problems are collected, then raised once."""
    problems: list[str] = []
    missing: list[int] = []
    inputs: list[ShardInput] = []
    for task in range(embed.num_tasks):
        mpath = marker_path(run_dir, embed.stage_dir, task)
        if not mpath.exists():
            missing.append(task)
            continue
        try:
            marker = read_marker(mpath)
        except InvalidMarkerError as exc:
            problems.append(str(exc))
            continue
        if marker.config_hash != embed.config_hash:
            problems.append(f"{mpath}: written under another embed config; rerun task {task}")
            continue
        paths = shard_paths(run_dir, task)
        recorded = {o.path: o for o in marker.outputs}
        bad = False
        for p in paths.values():
            rel = str(p.relative_to(run_dir))
            out = recorded.get(rel)
            if not p.exists():
                problems.append(
                    f"shard {task}: {p} is missing (its marker exists); rerun task {task}"
                )
                bad = True
            elif out is not None and p.stat().st_size != out.bytes:
                problems.append(
                    f"shard {task}: {p} has {p.stat().st_size} bytes but its marker recorded "
                    f"{out.bytes}: the file is truncated or was modified; delete {mpath} and "
                    f"rerun task {task} (python launch.py retry {run_dir})"
                )
                bad = True
        if bad:
            continue
        try:
            header, offset = safetensors_header(paths["embeddings"])
            info = header["embeddings"]
        except (ArrayFormatError, KeyError) as exc:
            problems.append(f"shard {task}: {paths['embeddings']}: {exc}")
            continue
        rows, dim = info["shape"]
        expected_rows = marker.counts.get("embedded")
        if expected_rows is not None and rows != expected_rows:
            problems.append(
                f"shard {task}: {paths['embeddings']} has {rows} rows, marker says {expected_rows}"
            )
            continue
        start, stop = marker.row_range or (0, 0)
        inputs.append(
            ShardInput(
                task=task,
                row_start=start,
                row_stop=stop,
                rows=rows,
                dim=dim,
                dtype=_ST_NUMPY.get(info["dtype"], info["dtype"]),
                label=paths["embeddings"].name,
                embeddings_path=paths["embeddings"],
                data_offset=offset + info["data_offsets"][0],
                metadata_path=paths["metadata"],
                dropped_path=paths["dropped"],
                sha256=recorded[str(paths["embeddings"].relative_to(run_dir))].sha256,
                source_files=[str(p.relative_to(run_dir)) for p in paths.values()],
            )
        )
    if missing:
        problems.insert(
            0,
            f"{len(missing)} of {embed.num_tasks} embed shard(s) missing (no completion marker): "
            f"tasks {compress_indices(missing)}; run `python launch.py retry {run_dir}`",
        )
    if problems:
        raise ShardValidationError(
            "merge refused, nothing written:\n  - " + "\n  - ".join(problems)
        )
    return inputs


_LEGACY_NAME = re.compile(r"cluster(\d+)_gpu(\d+)\.pkl$")


def collect_legacy_shards(legacy_dir: Path, allow_pickle: bool) -> list[ShardInput]:
    """Load ``cluster{c}_gpu{g}.pkl`` shards of the seed runs (only with allow_pickle)."""
    if not allow_pickle:
        raise ShardValidationError(
            "merge.input=legacy reads pickle files, and loading a pickle runs whatever code it "
            "contains. Only do this for files you produced yourself: set merge.allow_pickle=true."
        )
    files = sorted(Path(legacy_dir).glob("cluster*_gpu*.pkl"))
    if not files:
        raise ShardValidationError(
            f"merge.legacy_dir={legacy_dir}: no cluster{{c}}_gpu{{g}}.pkl files found"
        )
    log.warning(
        "loading %d legacy pickle shard(s) from %s: unpickling runs code from those files "
        "(allowed by merge.allow_pickle=true)",
        len(files),
        legacy_dir,
    )
    import pickle

    inputs = []
    for i, f in enumerate(files):
        with open(f, "rb") as fh:
            obj = pickle.load(fh)
        try:
            emb = np.asarray(obj["embeddings"], dtype=np.float32)
            start, end = int(obj["start_index"]), int(obj["end_index"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardValidationError(
                f"{f}: expected a dict with embeddings, start_index, end_index ({exc})"
            ) from exc
        if emb.ndim != 2:
            raise ShardValidationError(f"{f}: embeddings must be 2-D, found shape {emb.shape}")
        # The seed scripts were inconsistent about an inclusive end index; accept both.
        if emb.shape[0] == end - start + 1:
            end += 1
        if emb.shape[0] != end - start:
            raise ShardValidationError(
                f"{f}: {emb.shape[0]} rows but start_index={start}, end_index={end}"
            )
        inputs.append(
            ShardInput(
                task=i,
                row_start=start,
                row_stop=end,
                rows=emb.shape[0],
                dim=emb.shape[1],
                dtype="float32",
                label=f.name,
                array=emb,
                source_files=[str(f)],
            )
        )
    return inputs


# ---------------------------------------------------------------------------------------
# Validation


def validate_layout(inputs: list[ShardInput], total_rows: int | None) -> None:
    """Ranges tile 0..total with no gap/overlap; one dim and dtype. Raises with every problem."""
    problems: list[str] = []
    ordered = sorted(inputs, key=lambda s: (s.row_start, s.row_stop))
    expected = 0
    for s in ordered:
        if s.row_start > expected:
            problems.append(
                f"gap: rows {expected}..{s.row_start} are in no shard (before {s.label})"
            )
        elif s.row_start < expected:
            problems.append(
                f"overlap: {s.label} covers rows {s.row_start}..{s.row_stop}, but rows "
                f"{s.row_start}..{min(expected, s.row_stop)} are already in an earlier shard"
            )
        expected = max(expected, s.row_stop)
    if total_rows is not None and expected != total_rows:
        problems.append(
            f"gap: rows {expected}..{total_rows} are in no shard (dataset has {total_rows})"
        )
    dims = {s.dim for s in inputs}
    if len(dims) > 1:
        common = max(dims, key=lambda d: sum(s.dim == d for s in inputs))
        for s in inputs:
            if s.dim != common:
                problems.append(f"{s.label}: dimension {s.dim}, the other shards have {common}")
    dtypes = {s.dtype for s in inputs}
    if len(dtypes) > 1:
        problems.append(f"shards have different dtypes: {sorted(dtypes)}")
    if problems:
        raise ShardValidationError(
            "merge refused, nothing written:\n  - " + "\n  - ".join(problems)
        )


# ---------------------------------------------------------------------------------------
# Streaming


def _iter_blocks(
    shard: ShardInput, chunk_rows: int, verify: bool, buffers: list[bytearray]
) -> Iterator[np.ndarray]:
    """Yield row blocks of a shard, reading its file once and hashing what is read.

    Two buffers alternate: while the caller checks and writes one block, the previous one
    is still being hashed on another thread. A yielded block is valid until the iteration
    after next.
    """
    if shard.array is not None:
        for i in range(0, shard.rows, chunk_rows):
            yield shard.array[i : i + chunk_rows]
        return
    assert shard.embeddings_path is not None
    row_bytes = shard.dim * np.dtype(shard.dtype).itemsize
    digest = hashlib.sha256() if verify else None
    pending: list[Future | None] = [None, None]
    with ThreadPoolExecutor(1) as pool, open(shard.embeddings_path, "rb", buffering=0) as fh:
        head = fh.read(shard.data_offset)
        if digest:
            digest.update(head)
        remaining, turn = shard.rows, 0
        while remaining:
            n = min(chunk_rows, remaining)
            if (prev := pending[turn]) is not None:
                prev.result()  # the hash of this buffer's last contents is done
            view = memoryview(buffers[turn])[: n * row_bytes]
            got = fh.readinto(view)
            if got != n * row_bytes:
                raise ShardValidationError(f"{shard.embeddings_path}: truncated while reading")
            if digest:  # hashlib releases the GIL: hash while the caller checks and copies
                pending[turn] = pool.submit(digest.update, view)
            yield np.frombuffer(view, dtype=shard.dtype).reshape(n, shard.dim)
            remaining -= n
            turn ^= 1
        tail = fh.read()
        for fut in pending:
            if fut is not None:
                fut.result()
        if digest:
            digest.update(tail)
            if digest.hexdigest() != shard.sha256:
                raise ShardValidationError(
                    f"{shard.embeddings_path}: sha256 differs from its completion marker: the "
                    f"file was modified or is corrupt; rerun task {shard.task}"
                )


@dataclass
class NormStats:
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")

    def add(self, norms: np.ndarray) -> None:
        if norms.size:
            n64 = norms.astype(np.float64)
            self.count += norms.size
            self.total += float(n64.sum())
            self.total_sq += float((n64 * n64).sum())
            self.low = min(self.low, float(n64.min()))
            self.high = max(self.high, float(n64.max()))

    def to_json(self) -> dict[str, float]:
        mean = self.total / max(self.count, 1)
        var = max(self.total_sq / max(self.count, 1) - mean * mean, 0.0)
        return {"min": self.low, "max": self.high, "mean": mean, "std": var**0.5}


def _row_indices(shard: ShardInput, positions: np.ndarray) -> list[int]:
    if shard.metadata_path is not None:
        idx = pq.read_table(shard.metadata_path, columns=["row_index"]).column(0).to_numpy()
        return [int(idx[p]) for p in positions]
    return [shard.row_start + int(p) for p in positions]


def merge_shards(
    inputs: list[ShardInput],
    out_dir: Path,
    formats: list[MergeFormat],
    *,
    keep_first: int | None = None,
    expected_rows: int | None = None,
    chunk_rows: int = 65536,
    verify_sha256: bool = True,
) -> dict:
    """Stream ``inputs`` (validated) into ``out_dir``; return the quality report dict."""
    ordered = sorted(inputs, key=lambda s: s.row_start)
    total = sum(s.rows for s in ordered)
    final_rows = total if keep_first is None else min(keep_first, total)
    if keep_first is not None and keep_first > total:
        raise ShardValidationError(
            f"merge.keep_first={keep_first} but only {total} rows were embedded"
        )
    if expected_rows is not None and final_rows != expected_rows:
        raise ShardValidationError(
            f"merge.expected_rows={expected_rows} but the shards hold {total} rows"
            + (f" ({final_rows} after keep_first)" if keep_first is not None else "")
            + "; nothing written"
        )
    dim, dtype = ordered[0].dim, ordered[0].dtype
    names = {MergeFormat.safetensors: "embeddings.safetensors", MergeFormat.npy: "embeddings.npy"}
    writers = [
        MatrixWriter(
            out_dir / names[MergeFormat(f)],
            final_rows,
            dim,
            dtype,
            metadata={"rows": str(final_rows), "dim": str(dim)},
        )
        for f in formats
    ]
    stats = NormStats()
    chunk = _chunk_rows(dim, np.dtype(dtype).itemsize, chunk_rows)
    # Allocated once: zero-filling fresh buffers per shard cost more than the copy itself.
    buffers = [bytearray(chunk * dim * np.dtype(dtype).itemsize) for _ in range(2)]
    bad_rows: list[str] = []
    chunks_info = []
    written = 0
    try:
        for shard in ordered:
            shard_written = 0
            offset = 0
            for block in _iter_blocks(shard, chunk, verify_sha256, buffers):
                norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float32))
                if not np.isfinite(norms).all():
                    rows_bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
                    if rows_bad.size:
                        bad_rows.append(
                            f"{shard.label}: NaN/Inf in dataset rows "
                            + ", ".join(map(str, _row_indices(shard, rows_bad[:20] + offset)))
                            + (f" and {rows_bad.size - 20} more" if rows_bad.size > 20 else "")
                        )
                offset += block.shape[0]
                take = min(block.shape[0], final_rows - written)
                if take > 0 and not bad_rows:
                    for w in writers:
                        w.write(block[:take])
                    stats.add(norms[:take])
                    written += take
                    shard_written += take
            chunks_info.append(
                {
                    "task": shard.task,
                    "label": shard.label,
                    "row_range": [shard.row_start, shard.row_stop],
                    "rows": shard.rows,
                    "rows_in_output": shard_written,
                    "output_range": [written - shard_written, written],
                    "source_files": shard.source_files,
                }
            )
        if bad_rows:
            raise ShardValidationError(
                "merge refused, nothing written: non-finite embeddings:\n  - "
                + "\n  - ".join(bad_rows)
            )
        paths = [w.close() for w in writers]
        digests = {p.name: w.sha256 for p, w in zip(paths, writers, strict=True)}
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return {
        "shape": [final_rows, dim],
        "dtype": dtype,
        "rows_embedded": total,
        "keep_first": keep_first,
        "l2_norm": stats.to_json(),
        "has_nan": False,
        "has_inf": False,
        "shards": chunks_info,
        "files": [p.name for p in paths],
        "sha256": digests,
    }


def merge_metadata(inputs: list[ShardInput], out: Path, keep_first: int | None) -> pa.Table | None:
    """Concatenate shard metadata (row_index, id, source, ...) in order, streamed by shard."""
    ordered = sorted(inputs, key=lambda s: s.row_start)
    writer = None
    left = keep_first
    with atomic_path(out) as tmp:
        for s in ordered:
            if s.metadata_path is not None:
                table = pq.read_table(s.metadata_path)
            else:
                idx = np.arange(s.row_start, s.row_stop, dtype=np.int64)
                table = pa.table(
                    {"row_index": idx, "id": idx.astype(str), "source": ["legacy"] * len(idx)}
                )
            if left is not None:
                table = table.slice(0, left)
                left -= table.num_rows
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        if writer is not None:
            writer.close()
    return None


def merge_dropped(inputs: list[ShardInput], out: Path) -> int:
    tables = [pq.read_table(s.dropped_path) for s in inputs if s.dropped_path is not None]
    table = pa.concat_tables(tables) if tables else DROPPED_SCHEMA.empty_table()
    table = table.sort_by("row_index")
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return table.num_rows


def _dir_name(source: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("._") or "source"
    name, n = base, 2
    while name in used:
        name, n = f"{base}-{n}", n + 1
    used.add(name)
    return name


def split_by_source(merged: Path, metadata: Path, out_dir: Path, chunk_rows: int) -> dict:
    """Write ``by_source/<source>/`` embeddings + metadata, gathering rows in chunks."""
    emb = open_embeddings(merged)
    meta = pq.read_table(metadata)
    dict_arr = pc.dictionary_encode(meta.column("source")).combine_chunks()
    codes = dict_arr.indices.to_numpy()
    uniques = dict_arr.dictionary.to_pylist()
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    used: set[str] = set()
    index = {}
    for code, source in enumerate(uniques):
        positions = order[bounds[code] : bounds[code + 1]]
        name = _dir_name(str(source), used)
        target = out_dir / name
        writer = MatrixWriter(target / merged.name, len(positions), emb.shape[1], str(emb.dtype))
        try:
            for i in range(0, len(positions), chunk_rows):
                writer.write(np.asarray(emb[positions[i : i + chunk_rows]]))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        with atomic_path(target / "metadata.parquet") as tmp:
            pq.write_table(meta.take(pa.array(positions)), tmp)
        index[str(source)] = {"dir": name, "rows": len(positions)}
    atomic_write_json(out_dir / "index.json", index)
    return index


def run_merge(
    cfg: DictConfig, run_dir: Path, spec: StageSpec, embed: StageSpec | None, total_rows: int
) -> CompletionMarker:
    """The merge task: collect, validate, stream, split; then the marker."""
    t0 = time.monotonic()
    m = cfg.merge
    out_dir = Path(run_dir) / STAGE_DIR
    if MergeInput(m.input) == MergeInput.legacy:
        if not m.legacy_dir:
            raise ShardValidationError("merge.input=legacy needs merge.legacy_dir=/path/to/pickles")
        inputs = collect_legacy_shards(Path(m.legacy_dir), bool(m.allow_pickle))
        validate_layout(inputs, None)
    else:
        if embed is None:
            raise ShardValidationError("merge.input=embed needs the embed stage in `stages`")
        inputs = collect_embed_shards(Path(run_dir), embed)
        validate_layout(inputs, total_rows)
    formats = [MergeFormat(f) for f in m.formats]
    if not formats:
        raise ShardValidationError("merge.formats is empty; use [safetensors] and/or [npy]")
    log.info(
        "merging %d shard(s), %d rows, into %s", len(inputs), sum(s.rows for s in inputs), out_dir
    )
    report = merge_shards(
        inputs,
        out_dir,
        formats,
        keep_first=m.keep_first,
        expected_rows=m.expected_rows,
        chunk_rows=int(m.chunk_rows),
        verify_sha256=bool(m.verify_sha256),
    )
    merge_metadata(inputs, out_dir / "metadata.parquet", m.keep_first)
    report["rows_dropped"] = merge_dropped(inputs, out_dir / "dropped_rows.parquet")
    main = out_dir / report["files"][0]
    if m.by_source:
        report["by_source"] = split_by_source(
            main, out_dir / "metadata.parquet", out_dir / "by_source", int(m.chunk_rows)
        )
    atomic_write_json(out_dir / "quality_report.json", report)
    outputs = [out_dir / f for f in report["files"]] + [
        out_dir / "metadata.parquet",
        out_dir / "dropped_rows.parquet",
        out_dir / "quality_report.json",
    ]
    marker = CompletionMarker(
        stage=STAGE_DIR,
        task=0,
        num_tasks=1,
        config_hash=spec.config_hash,
        row_range=[0, report["shape"][0]],
        counts={
            "rows": report["shape"][0],
            "dim": report["shape"][1],
            "shards": len(inputs),
            "dropped": report["rows_dropped"],
        },
        outputs=describe_outputs(Path(run_dir), outputs, known=report["sha256"]),
        wall_seconds=time.monotonic() - t0,
    )
    write_marker(Path(run_dir), STAGE_DIR, marker)
    log.info(
        "merge done: %s rows x %s dims in %.1fs",
        report["shape"][0],
        report["shape"][1],
        marker.wall_seconds,
    )
    return marker
