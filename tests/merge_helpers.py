"""Shared by the merge tests: the seed runs' legacy pickles as two hosts left them after a
sync (``sync/<source>/``), and a row-aligned articles file in each supported format."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_pickle(path: Path, emb: np.ndarray, start: int) -> None:
    """A seed-run shard: ``end_index`` inclusive, as the seed scripts wrote it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shard = {"embeddings": emb, "start_index": start, "end_index": start + len(emb) - 1}
    with open(path, "wb") as fh:
        pickle.dump(shard, fh)


def two_host_legacy(run_dir: Path, data: np.ndarray, b_start: int = 20) -> None:
    """40 rows of ``data`` as two hosts' shards synced into ``run_dir/sync``: host a holds
    cluster 0 (rows 0..20, in a subdirectory), host b cluster 1 (rows ``b_start``..40).
    Beside them, what the sync stage keeps there: its marker and record, and a partial download."""
    sync = run_dir / "sync"
    write_pickle(sync / "a" / "out" / "cluster0_gpu0.pkl", data[0:12], 0)
    write_pickle(sync / "a" / "out" / "cluster0_gpu1.pkl", data[12:20], 12)
    write_pickle(sync / "b" / "cluster1_gpu0.pkl", data[b_start:32], b_start)
    write_pickle(sync / "b" / "cluster1_gpu1.pkl", data[32:40], 32)
    (sync / "b" / "cluster1_gpu2.pkl.part").write_bytes(b"partial")
    for own in ("completions/task_00000.json", "records/task_00000.json"):
        (sync / own).parent.mkdir(parents=True)
        (sync / own).write_text("{}")


def articles(n: int) -> list[dict]:
    """The seed's articles file: one ``{id, title, url, text}`` per dataset row."""
    return [
        {"id": f"w{i}", "title": f"t{i}", "url": f"u/{i}", "text": "x" * (i % 7)} for i in range(n)
    ]


def write_articles(path: Path, rows: list[dict], fmt: str) -> Path:
    """``rows`` as parquet (small row groups: read in several batches), jsonl or pkl."""
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "wb") as fh:
            pickle.dump(rows, fh)
    return path
