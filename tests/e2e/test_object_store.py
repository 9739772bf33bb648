"""A run dir on object storage: ``run.root=s3://BUCKET/runs`` against a real S3 server on
loopback (moto's server; endpoint and credentials from the environment, never from the
run config). The quickstart and the curation give the same bytes as on a local disk, and
a task killed mid-shard leaves nothing that looks complete without its marker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib.core.hashing import sha256_file
from lib.core.markers import read_marker, valid_marker
from lib.core.paths import RunPaths
from lib.core.storage import open_storage
from lib.formats.arrays import ArrayFormatError, read_safetensors_header
from tests.conftest import REPO, kill_task_when, run_launch, start_launch

pytestmark = pytest.mark.slow

# Small parts and batches: a task takes several seconds, so it can be killed mid-shard.
SLICE = [
    "+experiment=quickstart",
    "dataset.limit=160",
    "embed.num_shards=2",
    "model.max_length=96",
    "embed.part_rows=40",
    "embed.batch_size=4",
    "embed.log_every_seconds=0.2",
    "cluster.parallelism=1",
]
CURATION = [
    "+experiment=curation",
    "dataset.limit=120",
    "embed.num_shards=1",
    "model.max_length=96",
    "kmeans.n_clusters=[12,4]",
    "kmeans.n_resampling_steps=[3,1]",
    "kmeans.sample_size=[5,2]",
    "kmeans.n_iters=20",
    "curate.target_size=60",
]


def _ok(proc):
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def local_slice(shared_root) -> Path:
    _ok(run_launch(*SLICE, f"run.root={shared_root}", "run.name=s3-ref"))
    return shared_root / "s3-ref"


def _same_files(local: Path, remote: RunPaths, names: list[str]) -> None:
    for name in names:
        assert remote.storage.sha256(name) == sha256_file(local / name), name


def _status(run: str) -> str:
    return subprocess.run(
        [sys.executable, "launch.py", "status", run], cwd=REPO, capture_output=True, text=True
    ).stdout


def test_curation_on_s3_equals_local(s3_root, shared_root):
    _ok(run_launch(*CURATION, f"run.root={shared_root}", "run.name=s3-cur-ref"))
    local = shared_root / "s3-cur-ref"
    _ok(run_launch(*CURATION, f"run.root={s3_root}", "run.name=cur"))
    remote = RunPaths(f"{s3_root}/cur")
    arrays = sorted(str(p.relative_to(local)) for p in (local / "kmeans").rglob("*.npy"))
    assert "kmeans/curated/embedding_rows.npy" in arrays and len(arrays) > 15
    _same_files(local, remote, ["merge/embeddings.safetensors", *arrays])
    assert sorted(n for n in remote.storage.list("kmeans") if n.endswith(".npy")) == arrays
    assert "all stages complete" in _status(remote.root)


def _whole(storage, name: str, size: int) -> None:
    """Every object is a complete file of its kind."""
    if name.endswith(".safetensors"):
        with storage.open(name) as fh:
            header, offset = read_safetensors_header(fh, size, name)
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        assert offset + end == size, f"{name}: {size} bytes, its header needs {offset + end}"
    elif name.endswith(".parquet"):
        pq.read_table(pa.BufferReader(storage.read_bytes(name)))
    elif name.endswith(".json"):
        json.loads(storage.read_bytes(name))


def test_kill_an_embed_task_mid_shard_then_rerun(s3_root, local_slice):
    run = f"{s3_root}/killed"
    paths = RunPaths(run)
    watch = open_storage(run)  # our own view of the bucket, no listing cache
    first_part = paths.embed_part_marker(1, 0)
    proc = start_launch(*SLICE, f"run.root={s3_root}", "run.name=killed")
    attempt = paths.attempt("embed", 1)
    killed = kill_task_when(
        proc,
        lambda: watch.read_bytes(attempt) if watch.exists(attempt) else None,
        lambda: watch.exists(first_part),
        timeout=300,
    )
    out, _ = proc.communicate(timeout=300)
    assert killed is not None, f"task 1 never finished a part:\n{out[-3000:]}"
    assert proc.returncode != 0 and "FAILED (killed by SIGKILL)" in out
    listing = watch.list("")
    assert not any(".tmp-" in name for name in listing)
    for name, size in listing.items():
        try:
            _whole(watch, name, size)
        except (ArrayFormatError, pa.ArrowInvalid, ValueError) as exc:
            pytest.fail(f"{name} looks complete but is not: {exc}")
    # the killed task's shard and marker are absent; every marker present is valid
    assert paths.marker("embed", 1) not in listing
    assert paths.embed_shard(1).embeddings not in listing
    assert first_part in listing  # its finished part survives
    for name in listing:
        if "/completions/" in name or (name.endswith(".json") and "/parts/" in name):
            marker = read_marker(watch, name)
            assert valid_marker(watch, name, marker.config_hash) is not None, name
    assert not any(n.startswith("merge/") for n in listing)
    assert "failed embed tasks 1" in _status(run)

    resumed = _ok(run_launch(*SLICE, f"run.root={s3_root}", "run.name=killed"))
    assert "resuming" in resumed.stdout and "running 1" in resumed.stdout
    assert f"{run}/merge/embeddings.safetensors" in resumed.stdout
    log = paths.storage.read_text(paths.log("embed", 1))
    assert "1 already done" in log  # the surviving part was reused
    # The resumed run on S3 has the same bytes as the uninterrupted local one.
    _same_files(
        local_slice,
        paths,
        [
            "merge/embeddings.safetensors",
            "merge/metadata.parquet",
            "merge/dropped_rows.parquet",
            "embed/shards/shard_00000.safetensors",
            "embed/shards/shard_00001.safetensors",
        ],
    )
    listing = paths.storage.list("")
    assert not any(".tmp-" in name for name in listing)
    assert "embed/logs/task_00001.log" in listing  # task logs are published too
    assert "run.yaml" in listing and "plan.json" in listing
    status = _status(run)
    assert "all stages complete" in status and "embed                   2      2" in status
    again = _ok(run_launch(*SLICE, f"run.root={s3_root}", "run.name=killed"))
    assert "embed: all 2 task(s) already complete" in again.stdout
    assert "merge: all 1 task(s) already complete" in again.stdout
