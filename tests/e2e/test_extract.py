"""stages=[extract] through launch.py: local tasks (two, then a rerun that redoes
nothing), the same run on a real S3 server on loopback (moto) giving identical shards,
the SLURM array scripts of a dry run, and a layer out of range refused before anything
is written."""

from __future__ import annotations

import pytest

from lib.core.paths import RunPaths
from lib.extract import ActivationReader
from tests.conftest import run_launch
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
