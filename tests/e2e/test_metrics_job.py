"""The metrics jobs as users run them: ``python -m jobs.metrics CLUSTER`` (1 and 2 ranks,
the sanity check, W&B offline) and the pipeline stage's ``python -m jobs.metrics_level``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.metrics_helpers import (
    assert_matches_sklearn,
    check_outputs,
    make_clustering,
    run_job,
)


@pytest.fixture(scope="module")
def clustering_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_clustering(root / "toy")
    return root


def test_standalone_job_all_levels(clustering_root, tmp_path):
    out = tmp_path / "out"
    proc = run_job(
        "toy", f"run.root={clustering_root}", f"metrics.output_dir={out}", "metrics.block_rows=128"
    )
    assert proc.returncode == 0, proc.stderr
    assert "Cluster metrics" in proc.stdout and "davies_bouldin" in proc.stdout
    docs = check_outputs(out, clustering_root / "toy")
    assert docs[1]["k"] == 10 and docs[2]["k"] == 3 and docs[1]["world_size"] == 1


def test_sanity_check_compares_with_sklearn(clustering_root):
    proc = run_job(
        "toy", f"run.root={clustering_root}", "--sanity-check", "metrics.sanity_sample=400"
    )
    assert proc.returncode == 0, proc.stderr
    assert "sanity check passed" in proc.stderr
    assert proc.stdout.count(" ok ") >= 10 and "MISMATCH" not in proc.stdout


def test_world_size_2_job_equals_world_size_1(clustering_root, tmp_path):
    from tests.dist_helpers import free_port

    outs = {}
    for world in (1, 2):
        out = tmp_path / f"ws{world}"
        port = free_port()
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "jobs.metrics", "toy", f"run.root={clustering_root}",
                 f"metrics.output_dir={out}", "metrics.block_rows=64"],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO), "RANK": str(r),
                     "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in range(world)
        ]  # fmt: skip
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        outs[world] = check_outputs(out, clustering_root / "toy")
    for level in (1, 2):
        assert outs[2][level]["world_size"] == 2
        for key in ("silhouette", "davies_bouldin", "calinski_harabasz", "inertia"):
            assert outs[2][level][key] == pytest.approx(outs[1][level][key], rel=1e-9)


# -- W&B offline ------------------------------------------------------------------------------
def wandb_records(path: Path):
    """Records of an offline run's ``.wandb`` file (LevelDB-log framing of wandb's own
    protobuf ``Record``s, as ``wandb sync`` reads them)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B datastore"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf + chunk if kind == 4 else chunk)
            buf = b""
            yield rec
        else:
            buf = chunk if kind == 2 else buf + chunk


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_holds_the_logged_values(clustering_root, tmp_path):
    out = tmp_path / "out"
    proc = run_job(
        "toy",
        f"run.root={clustering_root}",
        f"metrics.output_dir={out}",
        "tracking=wandb",
        "metrics.levels=[1]",
        env={"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"},
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "level1" / "metrics.json").read_text())
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    history, summary = {}, {}
    for rec in wandb_records(next(runs[0].glob("*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.update({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in rec.summary.update})
    for key in ("silhouette", "davies_bouldin", "calinski_harabasz", "inertia"):
        assert history[f"level1/{key}"] == pytest.approx(doc[key], rel=1e-12)
        assert summary[f"level1/{key}"] == pytest.approx(doc[key], rel=1e-12)
    # the per-cluster table and the examples are files of the run
    per = json.loads(next(runs[0].glob("files/media/table/level1/per_cluster_*.json")).read_text())
    assert per["columns"][:2] == ["cluster", "size"]
    assert sum(row[1] for row in per["data"]) == 600
    ex = json.loads(next(runs[0].glob("files/media/table/level1/examples_*.json")).read_text())
    assert {row[0] for row in ex["data"]} >= {"best_by_inertia", "worst_by_silhouette"}
    assert all(row[-1].startswith("row ") for row in ex["data"])


def test_pipeline_stage_job_with_two_ranks(tmp_path):
    """The stage entry point (--run-dir/--stage) on a run dir whose plan has a k-means level
    (stand-in for the kmeans stage: its marker is the one run_hierarchy wrote)."""
    from omegaconf import OmegaConf

    from lib.config.schema import EmbedfleetConfig
    from lib.core.markers import read_marker
    from lib.core.paths import RunPaths
    from lib.metrics.plan import build as metrics_stages
    from lib.plan.spec import DISTRIBUTED, Plan, StageSpec
    from tests.dist_helpers import free_port

    run = tmp_path / "run"
    make_clustering(run, n=300)
    storage = RunPaths(run).storage
    km_hash = read_marker(storage, RunPaths.marker("kmeans/level1", 0)).config_hash
    cfg = OmegaConf.structured(EmbedfleetConfig)
    cfg.run.dir = str(run)
    cfg.metrics.world_size = 2
    cfg.metrics.block_rows = 64
    km = StageSpec(
        "kmeans_level1", "kmeans", "jobs.kmeans", "kmeans/level1", DISTRIBUTED, 1, km_hash
    )
    specs = metrics_stages(cfg, 300, {"kmeans_level1": km})
    Plan([km, *specs], 300).save(run)
    OmegaConf.save(cfg, run / "run.yaml")
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jobs.metrics_level", "--run-dir", str(run), "--stage", "metrics_level1"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "RANK": str(r), "WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    doc = json.loads((run / "metrics/level1/metrics.json").read_text())
    assert doc["world_size"] == 2
    X = np.load(run / "merge/embeddings.npy")
    assert_matches_sklearn(doc, X, np.load(run / "kmeans/level1/step0/assignment.npy"))
    marker = read_marker(storage, RunPaths.marker("metrics/level1", 0))
    assert marker.config_hash == specs[0].config_hash
    assert {Path(o.path).name for o in marker.outputs} == {
        "metrics.json", "per_cluster.parquet", "examples.json"
    }  # fmt: skip
