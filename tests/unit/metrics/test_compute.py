"""Cluster metrics (lib/metrics) against scikit-learn, on real k-means outputs
(lib.kmeans), with 1 and 2 real gloo processes; CLUSTER resolution and bad outputs run
the named-clustering command in this process."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from lib.core.errors import ConfigError
from lib.core.paths import RunPaths
from lib.formats.arrays import ArrayFormatError, save_npy, sidecar_path
from lib.metrics.blocks import ClusterMetricsError
from lib.metrics.compute import compute_metrics
from lib.metrics.params import MetricsParams
from lib.metrics.scratch import Scratch
from tests.dist_helpers import run_world
from tests.metrics_helpers import (
    RTOL,
    assert_matches_sklearn,
    blobs,
    composed_labels,
    make_clustering,
    run_inproc,
)

# -- the metrics against scikit-learn ------------------------------------------------------
# Small blocks so that every path crosses block boundaries; both silhouette strategies
# (symmetric blocks with N x k sums; row ranges against all points) and both dtypes.
PARAMS = {
    "sym64": MetricsParams(block_rows=96, compute_dtype="float64"),
    "sym32": MetricsParams(block_rows=96, compute_dtype="float32"),
    "rows32": MetricsParams(block_rows=96, compute_dtype="float32", silhouette_acc_bytes=0),
    "streamed64": MetricsParams(
        block_rows=96, compute_dtype="float64", resident_bytes=0, silhouette_acc_bytes=0
    ),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_world_size_1_matches_sklearn(name):
    X, y = blobs()
    res = compute_metrics(X, y, 6, PARAMS[name])
    assert res.scalars["silhouette_method"] == "exact"
    assert res.scalars["n_clusters"] == 6 and res.scalars["n_empty"] == 0
    assert_matches_sklearn(res.scalars, X, y)
    # per-cluster inertia and sizes add up; per-cluster silhouette means as sklearn's
    assert res.per_cluster["size"].sum() == len(y)
    assert res.per_cluster["inertia"].sum() == pytest.approx(res.scalars["inertia"], rel=1e-12)
    s = skm.silhouette_samples(X, y)
    for c in range(6):
        assert res.per_cluster["silhouette"][c] == pytest.approx(s[y == c].mean(), rel=1e-6)


def test_float32_embeddings_match_sklearn():
    X, y = blobs(dtype=np.float32)
    res = compute_metrics(X, y, 6, MetricsParams(block_rows=128))
    assert_matches_sklearn(res.scalars, X, y)


def _world_metrics(X, y, k, params):
    return compute_metrics(X, y, k, params, progress=lambda _: None).scalars


def _world_metrics_all(X, y, k, names):
    return [_world_metrics(X, y, k, PARAMS[n]) for n in names]


def test_world_size_2_matches_sklearn_and_world_size_1():
    X, y = blobs(n=650)
    names = ["sym32", "rows32"]  # both silhouette strategies, one 2-process world
    ranks = run_world(_world_metrics_all, 2, X, y, 6, names)
    assert ranks[0] == ranks[1]  # every rank returns the same values
    for name, got in zip(names, ranks[0], strict=True):
        assert_matches_sklearn(got, X, y)
        ws1 = compute_metrics(X, y, 6, PARAMS[name]).scalars
        for key in ("silhouette", "davies_bouldin", "calinski_harabasz", "inertia"):
            assert got[key] == pytest.approx(ws1[key], rel=1e-9), (name, key)


def test_sampled_silhouette_is_sklearns_sample():
    X, y = blobs(n=900)
    params = MetricsParams(block_rows=64, silhouette_exact_max=500, sample_size=300, seed=7)
    res = compute_metrics(X, y, 6, params)
    assert res.scalars["silhouette_method"] == "sampled"
    assert res.scalars["silhouette_points"] == 300
    want = skm.silhouette_score(X, y, sample_size=300, random_state=7)
    assert res.scalars["silhouette"] == pytest.approx(want, rel=RTOL)
    exact = compute_metrics(X, y, 6, replace(params, silhouette_exact_max=900)).scalars
    assert exact["silhouette_method"] == "exact"
    assert exact["silhouette"] == pytest.approx(skm.silhouette_score(X, y), rel=RTOL)
    assert exact["silhouette"] != res.scalars["silhouette"]


def test_empty_clusters_are_ignored_as_sklearn_does():
    X, y = blobs()
    y = np.where(y == 2, 9, y)  # labels 2, 6, 7, 8 carry no point; k = 11
    res = compute_metrics(X, y, 11, PARAMS["sym64"])
    assert res.scalars["n_clusters"] == 6 and res.scalars["n_empty"] == 5
    assert_matches_sklearn(res.scalars, X, y)
    per = res.per_cluster
    assert per["size"][2] == 0 and np.isnan(per["inertia"][2]) and per["nearest_cluster"][2] == -1
    assert set(per["nearest_cluster"][per["size"] > 0]) <= {0, 1, 3, 4, 5, 9}


def test_singleton_cluster_silhouette_is_zero_as_sklearn():
    X, y = blobs(n=300)
    y = y.copy()
    y[0] = 6  # a cluster of one point
    res = compute_metrics(X, y, 7, PARAMS["sym64"])
    assert_matches_sklearn(res.scalars, X, y)
    assert res.per_cluster["silhouette"][6] == 0.0


def test_single_cluster_is_a_clear_error():
    X, _ = blobs(n=100)
    with pytest.raises(ClusterMetricsError, match="undefined for 1 non-empty cluster"):
        compute_metrics(X, np.zeros(100, dtype=np.int64), 4, PARAMS["sym64"])


def test_labels_of_the_wrong_length_or_range():
    X, y = blobs(n=100)
    with pytest.raises(ClusterMetricsError, match="shape \\[99\\] but there are 100 points"):
        compute_metrics(X, y[:99], 6, PARAMS["sym64"])
    with pytest.raises(ClusterMetricsError, match="outside 0..3"):
        compute_metrics(X, y, 4, PARAMS["sym64"])


def test_scratch_memmap_sidecar_mismatch_is_an_error(tmp_path):
    sc = Scratch(tmp_path, rank=0)
    sc.create("own_dist", (10,), "float64")
    assert sc.open("own_dist", (10,), "float64").shape == (10,)
    side = sidecar_path(sc.path("own_dist"))
    side.write_text(json.dumps({"shape": [5], "dtype": "float64"}))
    with pytest.raises(ArrayFormatError, match="needs 40"):
        sc.open("own_dist", (10,), "float64")
    side.write_text(json.dumps({"shape": [20], "dtype": "float32"}))
    with pytest.raises(ArrayFormatError, match="expected shape \\[10\\]"):
        sc.open("own_dist", (10,), "float64")
    sc.cleanup()
    assert not sc.path("own_dist").exists() and not side.exists()


# -- a real hierarchy: levels, CLUSTER resolution ------------------------------------------
@pytest.fixture(scope="module")
def clustering_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_clustering(root / "toy")
    return root


def test_flatten_levels_composes_through_lower_levels(clustering_root):
    from lib.metrics.levels import flatten_levels

    run = clustering_root / "toy"
    flat = flatten_levels(RunPaths(run), [1, 2], 600)
    want = composed_labels(run)
    assert flat[1][1] == 10 and flat[2][1] == 3
    np.testing.assert_array_equal(flat[1][0], want[1])
    np.testing.assert_array_equal(flat[2][0], want[2])
    with pytest.raises(ClusterMetricsError, match="has 600 entries but there are 601"):
        flatten_levels(RunPaths(run), [1], 601)


def test_unknown_cluster_lists_the_ones_that_exist(clustering_root, capsys):
    code, err = run_inproc(capsys, "nosuch", f"run.root={clustering_root}")
    assert code == 1
    assert "unknown clustering 'nosuch'" in err
    assert "quickstart" in err and "toy" in err


def test_configured_clustering_resolves_through_conf(clustering_root, tmp_path):
    # conf/clustering/quickstart.yaml points at ${run.root}/quickstart
    from lib.config.compose import compose
    from lib.metrics.named import clustering_inputs, resolve_clustering

    cfg = resolve_clustering("quickstart", [f"run.root={clustering_root}"], compose)
    assert cfg.clustering.run_dir == f"{clustering_root}/quickstart"
    with pytest.raises(ConfigError, match="kmeans does not exist"):
        clustering_inputs(cfg)
    cfg = resolve_clustering("toy", [f"run.root={clustering_root}"], compose)
    inputs = clustering_inputs(cfg)
    assert inputs.embeddings == clustering_root / "toy/merge/embeddings.npy"
    assert inputs.metadata == clustering_root / "toy/merge/metadata.parquet"


def _republish_markers(run: Path) -> None:
    """Make the k-means markers describe the files as they are now: outputs that are
    wrong but published as such (a buggy writer), past the markers' own check."""
    for marker in run.glob("kmeans/**/completions/task_*.json"):
        doc = json.loads(marker.read_text())
        for out in doc["outputs"]:
            raw = (run / out["path"]).read_bytes()
            out["bytes"], out["sha256"] = len(raw), hashlib.sha256(raw).hexdigest()
        marker.write_text(json.dumps(doc))


def test_an_output_changed_behind_its_marker_invalidates_the_level(tmp_path, capsys):
    run = tmp_path / "changed"
    make_clustering(run, n=200)
    assignment = run / "kmeans/level1/step0/assignment.npy"
    raw = bytearray(assignment.read_bytes())
    raw[-8] ^= 1  # the last label, same size: only its sha256 tells
    assignment.write_bytes(bytes(raw))
    code, err = run_inproc(capsys, "changed", f"run.root={tmp_path}")
    assert code == 1
    assert "assignment.npy: sha256" in err
    assert "marker invalidated; rerun the same command to redo task 0 of kmeans_level1" in err
    assert not (run / RunPaths.marker("kmeans/level1", 0)).exists()
    assert not (run / RunPaths.marker("kmeans/level1/step0", 0)).exists()
    assert list((run / "kmeans/level1/completions/invalid").iterdir())


def test_bad_kmeans_outputs_are_clear_errors(tmp_path, capsys):
    run = tmp_path / "bad"
    make_clustering(run, n=200)
    step = run / "kmeans/level1/step0"
    good = np.load(step / "assignment.npy")
    # assignment length != N
    save_npy(step / "assignment.npy", good[:150])
    _republish_markers(run)
    code, err = run_inproc(capsys, "bad", f"run.root={tmp_path}")
    assert code == 1
    assert "has 150 entries but there are 200 embedding rows" in err
    # a sidecar that disagrees with its array
    save_npy(step / "assignment.npy", good)
    sidecar_path(step / "assignment.npy").write_text('{"shape": [201], "dtype": "int64"}')
    _republish_markers(run)
    code, err = run_inproc(capsys, "bad", f"run.root={tmp_path}")
    assert code == 1
    assert "sidecar says shape=[201]" in err and "assignment.npy" in err
    # every point in one cluster: silhouette/DB undefined
    save_npy(step / "assignment.npy", np.zeros_like(good))
    _republish_markers(run)
    code, err = run_inproc(capsys, "bad", f"run.root={tmp_path}", "metrics.levels=[1]")
    assert code == 1
    assert "undefined for 1 non-empty cluster" in err


# -- the pipeline stage builder -------------------------------------------------------------
def test_stage_builder_plans_one_distributed_stage_per_kmeans_level():
    from omegaconf import OmegaConf

    from lib.config.schema import EmbedfleetConfig
    from lib.metrics.plan import build as metrics_stages
    from lib.plan.registry import stage_module
    from lib.plan.spec import DISTRIBUTED, StageSpec

    assert stage_module("metrics").build is metrics_stages
    cfg = OmegaConf.structured(EmbedfleetConfig)
    cfg.metrics.world_size = 2
    km = {
        f"kmeans_level{i}": StageSpec(
            f"kmeans_level{i}", "kmeans", "jobs.kmeans", f"kmeans/level{i}", DISTRIBUTED, 1,
            f"h{i}", world_size=2,
        )
        for i in (1, 2)
    }  # fmt: skip
    prior = {**km, "kmeans": km["kmeans_level1"]}
    specs = metrics_stages(cfg, 100, prior)
    assert [s.name for s in specs] == ["metrics_level1", "metrics_level2"]
    s = specs[1]
    assert (s.group, s.job, s.stage_dir, s.kind) == (
        "metrics", "jobs.metrics_level", "metrics/level2", DISTRIBUTED
    )  # fmt: skip
    assert s.world_size == 2 and s.depends_on == ("kmeans_level2",)
    # perf-only settings keep the hash; metric settings change it
    cfg.metrics.block_rows = 7
    assert metrics_stages(cfg, 100, prior)[1].config_hash == s.config_hash
    cfg.metrics.sample_size = 7
    assert metrics_stages(cfg, 100, prior)[1].config_hash != s.config_hash
    with pytest.raises(ConfigError, match="no kmeans_level"):
        metrics_stages(cfg, 100, {})


def test_wandb_api_key_file_is_never_written(clustering_root, tmp_path):
    from omegaconf import OmegaConf

    from lib.metrics.tracking import make_tracker

    secret = "0123456789abcdef0123456789abcdef01234567"
    key_file = tmp_path / "key"
    key_file.write_text(secret + "\n")
    tcfg = OmegaConf.create(
        {"backend": "wandb", "project": "p", "entity": None, "mode": "offline",
         "api_key_file": str(key_file), "dir": None, "run_name": None, "tags": []}
    )  # fmt: skip
    env_before = os.environ.get("WANDB_API_KEY")
    os.environ.pop("WANDB_API_KEY", None)
    os.environ["WANDB_SILENT"] = "true"
    try:
        tracker = make_tracker(tcfg, tmp_path / "out", "toy", {"metrics": {"seed": 0}})
        tracker.finish()
    finally:
        os.environ.pop("WANDB_API_KEY", None)
        if env_before is not None:
            os.environ["WANDB_API_KEY"] = env_before
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written
    for p in written:
        assert secret.encode() not in p.read_bytes(), p
