"""``stages=[merge]`` on a run dir whose ``sync/`` already holds two hosts' legacy pickles
(what the sync stage leaves; no sshd here), with per-row metadata joined from an articles
file: the seed's ``--merge-only``. Without anything synced, the launch refuses before
writing run.yaml."""

import json

import numpy as np
import pyarrow.parquet as pq

from lib.formats.arrays import open_embeddings
from tests.conftest import run_launch
from tests.merge_helpers import articles, two_host_legacy, write_articles


def test_merge_only_of_synced_legacy_shards_with_metadata(tmp_path):
    root, run_dir = tmp_path / "runs", tmp_path / "runs" / "seed"
    args = [
        "+experiment=quickstart",
        "stages=[merge]",
        "merge.input=legacy",
        "merge.allow_pickle=true",
        f"run.root={root}",
        "run.name=seed",
    ]
    proc = run_launch(*args, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert f"{run_dir}/sync/<source>/" in out and "stages=[sync,merge]" in out, out
    assert not (run_dir / "run.yaml").exists()

    data = np.random.default_rng(1).normal(size=(40, 4)).astype(np.float32)
    two_host_legacy(run_dir, data)
    meta = write_articles(tmp_path / "articles.parquet", articles(45), "parquet")
    proc = run_launch(*args, f"merge.metadata_path={meta}", "merge.keep_first=30", timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    merged = np.asarray(open_embeddings(run_dir / "merge" / "embeddings.safetensors"))
    assert np.array_equal(merged, data[:30])
    table = pq.read_table(run_dir / "merge" / "metadata.parquet")
    assert table.column("row_index").to_pylist() == list(range(30))
    assert table.column("title").to_pylist() == [f"t{i}" for i in range(30)]
    assert table.column("id").to_pylist() == [f"w{i}" for i in range(30)]
    marker = json.loads((run_dir / "merge" / "completions" / "task_00000.json").read_text())
    assert marker["counts"]["rows"] == 30 and marker["counts"]["shards"] == 4
    report = json.loads((run_dir / "merge" / "quality_report.json").read_text())
    assert [s["source"] for s in report["shards"]] == ["a", "a", "b", "b"]
