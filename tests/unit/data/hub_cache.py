"""A Hugging Face hub cache built the way huggingface_hub lays it out (refs/main,
snapshots/<rev>/ linking into blobs/<hash>), for tests that read hub datasets offline:
testorg/tiny (parquet: 4 train files of 7/12/5/9 rows in row groups of 3, a test split,
configs ``small`` and ``partial``, the latter's card claiming a row more than its file
holds) and testorg/tinyjson (2 jsonl files of 4 rows)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REV = "0123456789abcdef0123456789abcdef01234567"
SIZES = [7, 12, 5, 9]  # rows per train file; row groups of 3
CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
- config_name: small
  data_files:
  - split: train
    path: data/train-00000-*.parquet
- config_name: partial
  data_files:
  - split: train
    path: data/train-00001-*.parquet
dataset_info:
- config_name: small
  splits:
  - name: train
    num_examples: {small_rows}
- config_name: partial
  splits:
  - name: train
    num_examples: {partial_rows}
---
# tiny
"""


def _put(repo, name: str, data: bytes) -> None:
    """``name`` in the snapshot as huggingface_hub stores it: a link to blobs/<hash>."""
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / REV / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=3)
    return sink.getvalue().to_pybytes()


def _repo(hub, name: str):
    repo = hub / f"datasets--testorg--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    return repo


def rows_table(start: int, n: int) -> pa.Table:
    ids = list(range(start, start + n))
    return pa.table({"id": [f"r{i}" for i in ids], "text": [f"row number {i}" for i in ids]})


def build_hub_cache(root: Path) -> Path:
    """The cache under ``root/hub`` (point HF_HUB_CACHE there); returns it."""
    cache = root / "hub"
    repo = _repo(cache, "tiny")
    _put(repo, "README.md", CARD.format(small_rows=SIZES[0], partial_rows=SIZES[1] + 1).encode())
    start = 0
    for i, n in enumerate(SIZES):
        data = _parquet(rows_table(start, n))
        _put(repo, f"data/train-{i:05d}-of-{len(SIZES):05d}.parquet", data)
        start += n
    _put(repo, "data/test-00000-of-00001.parquet", _parquet(rows_table(1000, 2)))
    repo = _repo(cache, "tinyjson")
    _put(
        repo, "README.md", b"---\nconfigs:\n- config_name: default\n  data_files: '*.jsonl'\n---\n"
    )
    for f in range(2):
        lines = [json.dumps({"id": f"{f}-{i}", "text": f"file {f} row {i}"}) for i in range(4)]
        _put(repo, f"part{f}.jsonl", "\n".join(lines).encode() + b"\n")
    return cache
