"""The merge stage's streaming pass: every shard copied once into the merged matrix.

The pass checks each row for NaN/Inf (reporting original row indices) and each shard's
sha256 against its marker while copying into the files being published; any problem
abandons them, so nothing is left that looks complete. Peak memory is one chunk
(``merge.chunk_rows`` rows, capped at ``CHUNK_BYTES``), whatever the total.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.core.errors import ShardValidationError
from lib.core.paths import RunPaths
from lib.core.storage import OutputFile, Storage
from lib.formats.matrix_writer import MatrixWriter
from lib.formats.parquet import read_table
from lib.merge.inputs import ShardInput, mismatch_message
from lib.merge.params import MergeFormat

# Small enough that a block stays in cache while it is read, checked, hashed twice and
# written (32 MiB blocks made every pass stream from DRAM: 2x slower end to end).
CHUNK_BYTES = 4 << 20


def _chunk_rows(dim: int, itemsize: int, limit: int) -> int:
    return max(1, min(limit, CHUNK_BYTES // max(1, dim * itemsize)))


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
    assert shard.embeddings is not None and shard.storage is not None
    where = shard.storage.url(shard.embeddings)
    row_bytes = shard.dim * np.dtype(shard.dtype).itemsize
    digest = hashlib.sha256() if verify else None
    pending: list[Future | None] = [None, None]
    with ThreadPoolExecutor(1) as pool, shard.storage.open(shard.embeddings) as fh:
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
                raise ShardValidationError(f"{where}: truncated while reading")
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
            if (found := digest.hexdigest()) != shard.sha256:
                problem = (
                    f"{where}: sha256 {found[:12]}... differs from the {str(shard.sha256)[:12]}"
                    "... its marker recorded (modified or corrupted in place)"
                )
                if shard.marker_name is None:
                    raise ShardValidationError(f"{problem}; rerun task {shard.task}")
                raise ShardValidationError(
                    "merge refused, nothing written: "
                    + mismatch_message(
                        shard.storage,
                        shard.marker_name,
                        shard.marker,
                        {shard.embeddings: problem},
                        shard.fix,
                    )
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
    if shard.metadata is not None and shard.storage is not None:
        idx = read_table(shard.storage, shard.metadata, ["row_index"]).column(0).to_numpy()
        return [int(idx[p]) for p in positions]
    return [shard.row_start + int(p) for p in positions]


def merge_shards(
    inputs: list[ShardInput],
    storage: Storage,
    formats: list[MergeFormat],
    *,
    keep_first: int | None = None,
    expected_rows: int | None = None,
    chunk_rows: int = 65536,
    verify_sha256: bool = True,
) -> tuple[dict, list[OutputFile]]:
    """Stream ``inputs`` (validated) into the merged embeddings, one file per format
    (``RunPaths.merge_embeddings``). Returns the quality report and the published files;
    raises ``ShardValidationError`` (nothing published) on any problem."""
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
    names = [RunPaths.merge_embeddings(MergeFormat(f).value) for f in formats]
    stack = contextlib.ExitStack()
    stats = NormStats()
    chunk = _chunk_rows(dim, np.dtype(dtype).itemsize, chunk_rows)
    # Allocated once: zero-filling fresh buffers per shard cost more than the copy itself.
    buffers = [bytearray(chunk * dim * np.dtype(dtype).itemsize) for _ in range(2)]
    bad_rows: list[str] = []
    chunks_info = []
    written = 0
    writers: list[MatrixWriter] = []
    try:
        # The first format is kept as the local copy: by_source and k-means read it next.
        staged = [
            stack.enter_context(storage.publish(n, digest=False, keep_local=i == 0))
            for i, n in enumerate(names)
        ]
        for s, n in zip(staged, names, strict=True):
            meta = {"rows": str(final_rows), "dim": str(dim)}
            writers.append(MatrixWriter(s.path, final_rows, dim, dtype, name=n, metadata=meta))
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
                    **({"source": shard.source} if shard.source else {}),
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
        for s, w in zip(staged, writers, strict=True):
            s.sha256 = w.close()
    except BaseException as exc:
        for w in writers:
            w.abort()
        stack.__exit__(type(exc), exc, exc.__traceback__)  # nothing is published
        raise
    stack.close()  # publishes every format
    outputs = [s.output for s in staged if s.output is not None]
    report = {
        "shape": [final_rows, dim],
        "dtype": dtype,
        "rows_embedded": total,
        "keep_first": keep_first,
        "l2_norm": stats.to_json(),
        "has_nan": False,
        "has_inf": False,
        "shards": chunks_info,
        "files": [Path(n).name for n in names],
        "sha256": {Path(o.path).name: o.sha256 for o in outputs},
    }
    return report, outputs
