"""stages=[extract] through launch.py: local tasks (two, then a rerun that redoes
nothing), the same run on a real S3 server on loopback (moto) and on a real GCS emulator
(fake-gcs-server; one of its tasks SIGKILLed mid-run, then the command rerun) giving
identical shards, the same run as a real SLURM array, the SLURM array scripts of a dry
run, and a layer out of range or a missing bucket refused before anything is written."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from lib.core.paths import RunPaths
from lib.core.storage import open_storage
from lib.extract import ActivationReader
from tests.conftest import run_launch, start_launch
from tests.slurm.test_launcher import _active, launch_cli
from tests.unit.extract.helpers import texts, tiny_qwen2, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract-e2e")
    return root, tiny_qwen2(root, layers=6), write_jsonl(root / "docs.jsonl", texts(12))


def _args(inputs, *extra: str) -> list[str]:
    _, model, data = inputs
    return [
        "dataset=files",
        f"dataset.path={data}",
        "stages=[extract]",
        f"extract.model={model}",
        "extract.layers=[2,4]",
        "extract.max_seq_length=32",
        "extract.batch_size=2",
        "extract.shard_size_mb=0.004",
        "extract.num_tasks=2",
        "cluster.parallelism=1",
        *extra,
    ]


def _ok(proc):
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _shards(paths: RunPaths) -> dict[str, str]:
    s = paths.storage
    return {
        n: s.sha256(n)
        for n in s.list("extract/")
        if n.endswith(".zst") or (n.endswith("/metadata.json") and "/task_" in n)
    }


@pytest.fixture(scope="module")
def local_run(inputs) -> RunPaths:
    root = inputs[0]
    proc = _ok(run_launch(*_args(inputs, f"run.root={root}/runs", "run.name=local")))
    assert "extract        12 samples" in proc.stdout
    return RunPaths(root / "runs" / "local")


def test_local_launch_then_rerun_is_a_no_op(inputs, local_run):
    merged = local_run.storage.read_json(local_run.extract_metadata)
    assert (merged["num_tasks"], merged["samples"], merged["layers"]) == (2, 12, [2, 4])
    assert merged["shards"] > 2
    before = _shards(local_run)
    reader = ActivationReader(local_run)
    ids = [int(i) for c in reader.iter_layer(4) for i in c.sample_ids]
    assert ids == list(range(12))
    proc = _ok(run_launch(*_args(inputs, f"run.root={inputs[0]}/runs", "run.name=local")))
    assert "running" not in proc.stdout  # every task already complete
    assert _shards(local_run) == before


def test_s3_run_equals_local(inputs, local_run, s3_root):
    _ok(run_launch(*_args(inputs, f"run.root={s3_root}", "run.name=s3")))
    remote = RunPaths(f"{s3_root}/s3")
    local = _shards(local_run)
    got = _shards(remote)
    assert {k: v for k, v in got.items() if k.endswith(".zst")} == {
        k: v for k, v in local.items() if k.endswith(".zst")
    }
    reader = ActivationReader(remote)  # range reads of the frames, sha256 checked
    a = ActivationReader(local_run).sample(7, 2)
    assert (reader.sample(7, 2) == a).all()


def test_slurm_dry_run_renders_an_array_then_the_merge(inputs):
    proc = _ok(
        run_launch(
            *_args(inputs, f"run.root={inputs[0]}/runs", "run.name=slurm"),
            "cluster=slurm",
            "--dry-run",
        )
    )
    assert "#SBATCH --array=0-1" in proc.stdout
    assert "-m jobs.extract --run-dir" in proc.stdout and "--stage extract_metadata" in proc.stdout
    assert "extract: would submit 2 task(s)" in proc.stdout


def test_layer_out_of_range_is_refused_at_launch(inputs):
    root = inputs[0]
    proc = run_launch(
        *_args(inputs, f"run.root={root}/runs", "run.name=bad"), "extract.layers=[2,7]"
    )
    assert proc.returncode == 1
    assert "extract.layers: [7] out of range" in proc.stderr
    assert "has 6 decoder layers" in proc.stderr
    assert not (root / "runs" / "bad" / "extract").exists()


def _zst(shards: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in shards.items() if k.endswith(".zst")}


def test_gs_run_killed_mid_task_then_rerun_equals_local(inputs, local_run, gcs_server, gcs_root):
    """On gs://, task 1 is SIGKILLed as soon as its first shard's marker is on the
    emulator, which is paused meanwhile, so the task dies mid-run with its next upload
    in flight. The same command, rerun, continues after the marked shards, and the shards
    equal the local run's byte for byte; the reader reads them remotely."""
    args = _args(inputs, f"run.root={gcs_root}", "run.name=gs")
    paths = RunPaths(f"{gcs_root}/gs")
    first_marker = gcs_server.file(paths.storage.url(paths.extract_shard_marker(1, 0)))
    attempt = gcs_server.file(paths.storage.url(paths.attempt("extract", 1)))
    proc = start_launch(*args)
    killed, deadline = None, time.time() + 600
    while killed is None and proc.poll() is None and time.time() < deadline:
        if first_marker.exists() and attempt.exists():  # the backend's files: no request
            os.kill(gcs_server.pid, signal.SIGSTOP)  # nothing more lands meanwhile
            try:
                killed = json.loads(attempt.read_bytes())["pids"][0]
                os.kill(killed, signal.SIGKILL)
            finally:
                os.kill(gcs_server.pid, signal.SIGCONT)
        time.sleep(0.002)
    out, _ = proc.communicate(timeout=600)
    assert killed is not None, f"task 1 never marked a shard:\n{out[-3000:]}"
    assert proc.returncode != 0 and "FAILED (killed by SIGKILL)" in out, out[-3000:]

    watch = open_storage(paths.root)
    listing = watch.list("extract/")
    marked = [n for n in listing if re.fullmatch(r"extract/task_00001/shard_\d{5}\.json", n)]
    assert 1 <= len(marked) < 3, listing  # caught mid-run: not all 3 shards marked
    assert paths.marker("extract", 1) not in listing
    assert paths.extract_task_metadata(1) not in listing
    assert paths.extract_metadata not in listing  # nothing merged from a partial run

    _ok(run_launch(*args))
    log = watch.read_text(paths.log("extract", 1))
    assert f"task 1: {len(marked)} shard(s) already written" in log
    assert _zst(_shards(paths)) == _zst(_shards(local_run))
    merged = watch.read_json(paths.extract_metadata)
    local = local_run.storage.read_json(local_run.extract_metadata)
    assert (merged["samples"], merged["tokens"], merged["shards"]) == (
        local["samples"],
        local["tokens"],
        local["shards"],
    )
    task1 = watch.read_json(paths.extract_task_metadata(1))
    assert [(s["name"], s["sha256"]) for s in task1["shards"]] == [
        (s["name"], s["sha256"])
        for s in local_run.storage.read_json(local_run.extract_task_metadata(1))["shards"]
    ]  # no orphan upload of the killed attempt counted
    reader = ActivationReader(paths)  # range reads from the emulator
    assert [int(i) for c in reader.iter_layer(2) for i in c.sample_ids] == list(range(12))
    assert (reader.sample(9, 4) == ActivationReader(local_run).sample(9, 4)).all()


def test_a_missing_gcs_bucket_is_refused_before_anything_is_written(inputs, gcs_server):
    proc = run_launch(*_args(inputs, "run.root=gs://no-such-bucket-18/runs", "run.name=x"))
    assert proc.returncode == 2, proc.stdout[-2000:]  # refused before the run starts
    assert "gs://no-such-bucket-18/runs/x is not writable" in proc.stderr
    assert "STORAGE_EMULATOR_HOST" in proc.stderr  # names the settings to check
    assert not gcs_server.file("gs://no-such-bucket-18").exists()  # no bucket made


@pytest.mark.slurm
def test_slurm_array_equals_local(inputs, local_run, slurm_cluster):
    root = inputs[0]
    run = root / "runs" / "on-slurm"
    proc = _ok(
        run_launch(*_args(inputs, f"run.root={root}/runs", "run.name=on-slurm"), "cluster=slurm")
    )
    assert "extract: submitted" in proc.stdout, proc.stdout
    # Wait on the merged metadata (published last) and squeue, not `launch.py status`
    # every few seconds: each status call is a Python start (CPU on a shared machine).
    deadline, idle = time.time() + 600, None
    while not (run / "extract" / "metadata.json").exists() and time.time() < deadline:
        idle = None if _active(run) else (idle or time.time())
        if idle and time.time() - idle > 10:  # nothing queued, still no output: failed
            break
        time.sleep(1)
    status = launch_cli("status", str(run)).stdout
    assert "all stages complete" in status, status
    paths = RunPaths(run)
    assert _zst(_shards(paths)) == _zst(_shards(local_run))
    log = paths.storage.read_text(paths.log("extract", 1))
    assert "slurm job" in log and "task 1 done" in log
