"""End to end through launch.py with the real model, on slices of the real corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib.formats.arrays import open_embeddings
from tests.conftest import REPO, kill_task_when, run_launch, start_launch

pytestmark = pytest.mark.slow

# embed.device=cpu: the references are fp32 CPU results (st_model), which a GPU's bf16 would
# not match at cosine 0.9999; tests/gpu/ holds the GPU comparison.
SLICE = [
    "+experiment=quickstart",
    "dataset.limit=240",
    "embed.num_shards=3",
    "model.max_length=96",
    "embed.device=cpu",
    # Small batches: a task makes progress in many steps, so the kill test below lands
    # mid-shard (and its uninterrupted reference is this module's run).
    "embed.batch_size=4",
]


def _ok(proc):
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _markers(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("*/completions/*.json"))


@pytest.fixture(scope="module")
def quick_run(shared_root) -> Path:
    proc = _ok(run_launch(*SLICE, f"run.root={shared_root}", "run.name=slice"))
    assert "complete in" in proc.stdout
    return shared_root / "slice"


def test_merged_rows_equal_direct_embedding(quick_run, corpus_table, st_model):
    emb = np.asarray(open_embeddings(quick_run / "merge" / "embeddings.safetensors"))
    meta = pq.read_table(quick_run / "merge" / "metadata.parquet")
    rows = meta.column("row_index").to_numpy()
    assert emb.shape == (len(rows), 384)
    assert np.all(np.diff(rows) > 0)  # original order kept
    texts = corpus_table.column("text").take(pa.array(rows)).to_pylist()
    ref = st_model.encode(texts, batch_size=32, convert_to_numpy=True)
    cos = np.sum(emb * ref, axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.9999, f"worst row {rows[cos.argmin()]}: cosine {cos.min()}"
    assert (
        meta.column("id").to_pylist() == corpus_table.column("id").take(pa.array(rows)).to_pylist()
    )


def test_long_rows_dropped_and_recorded(quick_run, tokenizer, corpus_table):
    dropped = pq.read_table(quick_run / "merge" / "dropped_rows.parquet").to_pylist()
    kept = set(
        pq.read_table(quick_run / "merge" / "metadata.parquet").column("row_index").to_pylist()
    )
    assert dropped, "the slice has docstrings longer than 96 tokens"
    assert len(kept) + len(dropped) == 240
    for row in dropped:
        assert row["reason"] == "too_long" and row["token_count"] > 96
        assert row["row_index"] not in kept
        text = corpus_table.column("text")[row["row_index"]].as_py()
        assert len(tokenizer(text)["input_ids"]) == row["token_count"]
        assert row["source"] == corpus_table.column("source")[row["row_index"]].as_py()
    report = json.loads((quick_run / "merge" / "quality_report.json").read_text())
    assert report["rows_dropped"] == len(dropped)
    assert report["shape"] == [len(kept), 384]
    assert abs(report["l2_norm"]["mean"] - 1.0) < 1e-4  # the model normalizes
    assert [s["row_range"] for s in report["shards"]] == [[0, 80], [80, 160], [160, 240]]


def test_run_yaml_and_by_source(quick_run):
    text = (quick_run / "run.yaml").read_text()
    assert "max_length: 96" in text and "limit: 240" in text
    index = json.loads((quick_run / "merge" / "by_source" / "index.json").read_text())
    meta = pq.read_table(quick_run / "merge" / "metadata.parquet")
    assert sum(v["rows"] for v in index.values()) == meta.num_rows
    assert set(index) == set(meta.column("source").to_pylist())


def test_status_and_resume_skip_everything(quick_run, shared_root):
    status = subprocess.run(
        [sys.executable, "launch.py", "status", str(quick_run)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0
    assert "embed                   3      3" in status.stdout
    assert "all stages complete" in status.stdout
    before = {p: p.stat().st_mtime_ns for p in quick_run.glob("embed/shards/*")}
    again = _ok(run_launch(*SLICE, f"run.root={shared_root}", "run.name=slice"))
    assert "embed: all 3 task(s) already complete" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in quick_run.glob("embed/shards/*")} == before


def test_truncated_shard_is_redone_on_relaunch(quick_run, shared_root, tmp_path):
    import shutil

    run = shared_root / "trunc"
    shutil.copytree(quick_run, run)
    for p in run.rglob("*.json"):
        if "completions" in p.parts or "attempts" in p.parts:
            p.write_text(p.read_text().replace(str(quick_run), str(run)))
    reference = np.asarray(open_embeddings(quick_run / "merge" / "embeddings.safetensors")).copy()
    shard = run / "embed" / "shards" / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    shutil.rmtree(run / "merge")
    proc = _ok(run_launch(*SLICE, f"run.root={shared_root}", "run.name=trunc"))
    assert "running 1" in proc.stdout  # only the damaged task
    merged = np.asarray(open_embeddings(run / "merge" / "embeddings.safetensors"))
    assert np.array_equal(merged, reference)


def test_kill_a_task_and_resume_gives_identical_output(quick_run, shared_root):
    args = [
        *SLICE,
        f"run.root={shared_root}",
        "run.name=killed",
        "cluster.parallelism=1",
        "embed.log_every_seconds=0.2",
    ]
    run = shared_root / "killed"
    proc = start_launch(*args)
    log = run / "embed" / "logs" / "task_00001.log"
    killed_pid = kill_task_when(
        proc,
        run / "embed" / "attempts" / "task_00001.json",
        lambda: log.exists() and "embed task 1:" in log.read_text(),
        timeout=300,
    )
    out, _ = proc.communicate(timeout=300)
    assert killed_pid is not None, f"task 1 never reached embedding:\n{out}"
    assert proc.returncode != 0
    assert "FAILED (killed by SIGKILL)" in out
    assert not (run / "embed" / "completions" / "task_00001.json").exists()
    assert not (run / "embed" / "shards" / "shard_00001.safetensors").exists()
    assert not (run / "merge" / "embeddings.safetensors").exists()
    status = subprocess.run(
        [sys.executable, "launch.py", "status", str(run)], cwd=REPO, capture_output=True, text=True
    )
    assert "failed embed tasks 1" in status.stdout

    resumed = _ok(run_launch(*args))
    assert "resuming" in resumed.stdout and "running 1" in resumed.stdout
    # The uninterrupted reference: the module's run of the same slice and settings
    # (parallelism and log cadence change nothing in the output).
    a = np.asarray(open_embeddings(run / "merge" / "embeddings.safetensors"))
    b = np.asarray(open_embeddings(quick_run / "merge" / "embeddings.safetensors"))
    assert np.array_equal(a, b)
    assert pq.read_table(run / "merge" / "metadata.parquet").equals(
        pq.read_table(quick_run / "merge" / "metadata.parquet")
    )


# Two shards once (row indices continue across shards); one where only the reader differs.
@pytest.mark.parametrize(("suffix", "shards"), [("parquet", 2), ("jsonl", 1), ("csv", 1)])
def test_users_own_file(tmp_path, suffix, shards):
    rows = [
        {"body": f"The {w} jumped over the lazy dog number {i}.", "n": i}
        for i, w in enumerate(["quick brown fox", "slow red hen", "tall green cat"] * 4)
    ]
    path = tmp_path / f"my.{suffix}"
    table = pa.Table.from_pylist(rows)
    if suffix == "parquet":
        pq.write_table(table, path)
    elif suffix == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    proc = _ok(
        run_launch(
            "+experiment=quickstart",
            f"dataset.path={path}",
            "dataset.text_field=body",
            f"run.root={tmp_path / 'out'}",
            f"embed.num_shards={shards}",
            "embed.device=cpu",
            cwd=tmp_path,
        )
    )
    run = tmp_path / "out" / "quickstart-my"
    assert str(run) in proc.stdout
    meta = pq.read_table(run / "merge" / "metadata.parquet")
    assert meta.column("row_index").to_pylist() == list(range(12))
    assert set(meta.column("source").to_pylist()) == {"my"}
    assert open_embeddings(run / "merge" / "embeddings.safetensors").shape == (12, 384)


# ------------------------------------------------------------------ bad input


def _nothing_complete(run: Path):
    assert _markers(run) == [] or all("embed" in str(m) for m in _markers(run))
    assert not (run / "merge" / "embeddings.safetensors").exists()
    assert not list(run.glob("merge/completions/*"))


def test_unknown_config_key_lists_valid_keys(tmp_path):
    proc = run_launch("+experiment=quickstart", "embed.bach_size=3", f"run.root={tmp_path}")
    assert proc.returncode == 2
    assert "full_key: embed.bach_size" in proc.stderr
    assert "valid keys under embed:" in proc.stderr and "batch_size" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_wrong_type_and_choice(tmp_path):
    proc = run_launch("+experiment=quickstart", "embed.num_shards=many", f"run.root={tmp_path}")
    assert proc.returncode == 2 and "embed.num_shards" in proc.stderr
    proc = run_launch("+experiment=quickstart", "embed.backend=onnx", f"run.root={tmp_path}")
    assert proc.returncode == 2 and "expected one of [hf, vllm]" in proc.stderr


def test_missing_dataset_path(tmp_path):
    proc = run_launch(
        "+experiment=quickstart",
        f"dataset.path={tmp_path}/nope.parquet",
        f"run.root={tmp_path}/out",
    )
    assert proc.returncode == 1
    assert f"{tmp_path}/nope.parquet does not exist" in proc.stderr
    assert not (tmp_path / "out" / "quickstart-nope" / "plan.json").exists()


def test_text_field_missing_lists_columns(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["a b c"], "title": ["t"]}), p)
    proc = run_launch(
        "+experiment=quickstart",
        f"dataset.path={p}",
        "dataset.text_field=txt",
        f"run.root={tmp_path}/out",
    )
    assert proc.returncode == 1
    assert "'txt' not found (from dataset.text_field)" in proc.stderr
    assert "the dataset has: body, title" in proc.stderr


def test_empty_dataset(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), p)
    proc = run_launch("+experiment=quickstart", f"dataset.path={p}", f"run.root={tmp_path}/out")
    assert proc.returncode == 1 and "has no rows" in proc.stderr


def test_null_text_row_fails_its_task_clearly(tmp_path):
    p = tmp_path / "d.parquet"
    texts = [f"sentence number {i} about parsing" for i in range(10)]
    texts[7] = None
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(10)], "text": texts}), p)
    args = [
        "+experiment=quickstart",
        f"dataset.path={p}",
        f"run.root={tmp_path}/out",
        "embed.num_shards=2",
    ]
    proc = run_launch(*args)
    run = tmp_path / "out" / "quickstart-d"
    assert proc.returncode == 1
    assert "1 row(s) have no text: row 7 (id r7)" in proc.stdout
    assert "dataset.on_null_text=drop" in proc.stdout
    assert not (run / "embed" / "completions" / "task_00001.json").exists()
    assert not (run / "embed" / "shards" / "shard_00001.safetensors").exists()
    _nothing_complete(run)
    proc = _ok(
        run_launch(
            *args[:-1], "run.name=dropnull", "dataset.on_null_text=drop", "embed.num_shards=2"
        )
    )
    dropped = pq.read_table(
        tmp_path / "out" / "dropnull" / "merge" / "dropped_rows.parquet"
    ).to_pylist()
    assert [(d["row_index"], d["id"], d["reason"]) for d in dropped] == [(7, "r7", "null_text")]


def test_model_path_missing(tmp_path):
    proc = run_launch(
        "+experiment=quickstart", f"model.path={tmp_path}/no-model", f"run.root={tmp_path}/out"
    )
    assert proc.returncode == 1
    assert f"model.path={tmp_path}/no-model does not exist" in proc.stderr
    assert not list((tmp_path / "out").glob("*/plan.json"))


def test_read_only_output_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:  # not root: permissions suffice
        ro.chmod(0o555)
    try:
        proc = run_launch("+experiment=quickstart", f"run.root={ro}")
        assert proc.returncode == 2
        assert "is not writable" in proc.stderr and "run.root=" in proc.stderr
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)
