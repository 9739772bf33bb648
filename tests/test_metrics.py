"""Cluster metrics (lib/metrics*.py, jobs/metrics.py) against scikit-learn, on real k-means
outputs (lib.hierarchical_kmeans), with 1 and 2 real gloo processes, on the real test
SLURM cluster, and with W&B in offline mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn import metrics as skm
from sklearn.datasets import make_blobs

from lib.arrays import ArrayFormatError, save_npy, sidecar_path
from lib.errors import ConfigError
from lib.metrics import ClusterMetricsError, MetricsParams, Scratch, compute_metrics
from tests.dist_helpers import run_world

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-6


def blobs(n=700, d=8, centers=6, seed=0, dtype=np.float64):
    X, y = make_blobs(n, d, centers=centers, random_state=seed, cluster_std=2.5)
    return X.astype(dtype), y.astype(np.int64)


def inertia_ref(X, labels):
    X = X.astype(np.float64)
    return sum(((X[labels == c] - X[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels))


def assert_matches_sklearn(scalars, X, labels, rtol=RTOL):
    ref = {
        "silhouette": skm.silhouette_score(X, labels),
        "davies_bouldin": skm.davies_bouldin_score(X, labels),
        "calinski_harabasz": skm.calinski_harabasz_score(X, labels),
        "inertia": inertia_ref(X, labels),
    }
    for key, want in ref.items():
        assert scalars[key] == pytest.approx(float(want), rel=rtol), key


# -- the metrics against scikit-learn ------------------------------------------------------
# Small blocks so that every path crosses block boundaries; both silhouette strategies
# (symmetric blocks with N x k sums; row ranges against all points) and both dtypes.
PARAMS = {
    "sym64": MetricsParams(block_rows=96, compute_dtype="float64"),
    "sym32": MetricsParams(block_rows=96, compute_dtype="float32"),
    "rows32": MetricsParams(block_rows=96, compute_dtype="float32", silhouette_acc_bytes=0),
    "streamed64": MetricsParams(block_rows=96, resident_bytes=0, silhouette_acc_bytes=0),
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


# -- a real hierarchy: levels, the job, CLUSTER resolution ----------------------------------
def make_clustering(run_dir: Path, n=600, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A run dir with merge/ outputs and a 2-level hierarchical k-means (10 -> 3)."""
    from lib.hierarchical_kmeans import HierarchyParams, run_hierarchy

    X, y = blobs(n=n, centers=6, seed=seed, dtype=np.float32)
    (run_dir / "merge").mkdir(parents=True, exist_ok=True)
    save_npy(run_dir / "merge" / "embeddings.npy", X)
    texts = [f"row {i} of blob {y[i]}" for i in range(n)]
    pq.write_table(
        pa.table({"id": [str(i) for i in range(n)], "text": texts}),
        run_dir / "merge" / "metadata.parquet",
        row_group_size=128,
    )
    params = HierarchyParams(
        n_levels=2,
        n_clusters=[10, 3],
        n_resampling_steps=[1, 1],
        sample_size=[1, 1],
        n_splits=[1, 1],
        n_iters=20,
        seed=seed,
    )
    run_hierarchy(run_dir, params, run_dir / "merge" / "embeddings.npy")
    return X, y


@pytest.fixture(scope="module")
def clustering_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_clustering(root / "toy")
    return root


def composed_labels(run_dir: Path) -> dict[int, np.ndarray]:
    a1 = np.load(run_dir / "kmeans/level1/step0/assignment.npy")
    a2 = np.load(run_dir / "kmeans/level2/step0/assignment.npy")
    return {1: a1, 2: a2[a1]}


def test_flatten_levels_composes_through_lower_levels(clustering_root):
    from lib.metrics_levels import flatten_levels

    run = clustering_root / "toy"
    flat = flatten_levels(run, [1, 2], 600)
    want = composed_labels(run)
    assert flat[1][1] == 10 and flat[2][1] == 3
    np.testing.assert_array_equal(flat[1][0], want[1])
    np.testing.assert_array_equal(flat[2][0], want[2])
    with pytest.raises(ClusterMetricsError, match="has 600 entries but there are 601"):
        flatten_levels(run, [1], 601)


def run_job(*args: str, env: dict | None = None, timeout: float = 300):
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full.pop("WANDB_API_KEY", None) if env is None or "WANDB_API_KEY" not in env else None
    return subprocess.run(
        [sys.executable, "-m", "jobs.metrics", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full,
    )


def run_inproc(capsys, *args: str) -> tuple[int, str]:
    """``python -m jobs.metrics ARGS`` in this process (no interpreter start-up)."""
    from jobs.metrics import main

    code = main(list(args))
    return code, capsys.readouterr().err


def check_outputs(out: Path, run: Path) -> dict[int, dict]:
    X = np.load(run / "merge" / "embeddings.npy")
    docs = {}
    for level, labels in composed_labels(run).items():
        doc = json.loads((out / f"level{level}" / "metrics.json").read_text())
        assert_matches_sklearn(doc, X, labels)
        per = pq.read_table(out / f"level{level}" / "per_cluster.parquet").to_pydict()
        assert sum(per["size"]) == 600
        examples = json.loads((out / f"level{level}" / "examples.json").read_text())
        kinds = {e["kind"] for e in examples}
        assert kinds == {
            "best_by_inertia",
            "worst_by_inertia",
            "best_by_silhouette",
            "worst_by_silhouette",
        }
        for e in examples:
            assert e["rows"] and all(r["text"].startswith(f"row {r['row']} ") for r in e["rows"])
            assert all(labels[r["row"]] == e["cluster"] for r in e["rows"])
        docs[level] = doc
    return docs


def test_standalone_job_all_levels(clustering_root, tmp_path):
    out = tmp_path / "out"
    proc = run_job(
        "toy", f"run.root={clustering_root}", f"metrics.output_dir={out}", "metrics.block_rows=128"
    )
    assert proc.returncode == 0, proc.stderr
    assert "Cluster metrics" in proc.stdout and "davies_bouldin" in proc.stdout
    docs = check_outputs(out, clustering_root / "toy")
    assert docs[1]["k"] == 10 and docs[2]["k"] == 3 and docs[1]["world_size"] == 1


def test_unknown_cluster_lists_the_ones_that_exist(clustering_root, capsys):
    code, err = run_inproc(capsys, "nosuch", f"run.root={clustering_root}")
    assert code == 1
    assert "unknown clustering 'nosuch'" in err
    assert "quickstart" in err and "toy" in err


def test_configured_clustering_resolves_through_conf(clustering_root, tmp_path):
    # conf/clustering/quickstart.yaml points at ${run.root}/quickstart
    from jobs.metrics import resolve_clustering
    from lib.clustering import clustering_inputs

    cfg = resolve_clustering("quickstart", [f"run.root={clustering_root}"])
    assert cfg.clustering.run_dir == f"{clustering_root}/quickstart"
    with pytest.raises(ConfigError, match="kmeans does not exist"):
        clustering_inputs(cfg)
    cfg = resolve_clustering("toy", [f"run.root={clustering_root}"])
    inputs = clustering_inputs(cfg)
    assert inputs.embeddings == clustering_root / "toy/merge/embeddings.npy"
    assert inputs.metadata == clustering_root / "toy/merge/metadata.parquet"


def test_bad_kmeans_outputs_are_clear_errors(tmp_path, capsys):
    run = tmp_path / "bad"
    make_clustering(run, n=200)
    step = run / "kmeans/level1/step0"
    good = np.load(step / "assignment.npy")
    # assignment length != N
    save_npy(step / "assignment.npy", good[:150])
    code, err = run_inproc(capsys, "bad", f"run.root={tmp_path}")
    assert code == 1
    assert "has 150 entries but there are 200 embedding rows" in err
    # a sidecar that disagrees with its array
    save_npy(step / "assignment.npy", good)
    sidecar_path(step / "assignment.npy").write_text('{"shape": [201], "dtype": "int64"}')
    code, err = run_inproc(capsys, "bad", f"run.root={tmp_path}")
    assert code == 1
    assert "sidecar says shape=[201]" in err and "assignment.npy" in err
    # every point in one cluster: silhouette/DB undefined
    save_npy(step / "assignment.npy", np.zeros_like(good))
    code, err = run_inproc(capsys, "bad", f"run.root={tmp_path}", "metrics.levels=[1]")
    assert code == 1
    assert "undefined for 1 non-empty cluster" in err


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


# -- the pipeline stage builder -------------------------------------------------------------
def test_stage_builder_plans_one_distributed_stage_per_kmeans_level():
    from omegaconf import OmegaConf

    from lib.config import EmbedfleetConfig
    from lib.metrics_stage import metrics_stages
    from lib.pipeline import DISTRIBUTED, STAGE_BUILDERS, StageSpec

    assert STAGE_BUILDERS["metrics"] is metrics_stages
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
        "metrics", "jobs.metrics", "metrics/level2", DISTRIBUTED
    )  # fmt: skip
    assert s.world_size == 2 and s.depends_on == ("kmeans_level2",)
    # perf-only settings keep the hash; metric settings change it
    cfg.metrics.block_rows = 7
    assert metrics_stages(cfg, 100, prior)[1].config_hash == s.config_hash
    cfg.metrics.sample_size = 7
    assert metrics_stages(cfg, 100, prior)[1].config_hash != s.config_hash
    with pytest.raises(ConfigError, match="no kmeans_level"):
        metrics_stages(cfg, 100, {})


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


def test_wandb_api_key_file_is_never_written(clustering_root, tmp_path):
    from omegaconf import OmegaConf

    from lib.tracking import make_tracker

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


# -- the checked-in sbatch script on the real test SLURM cluster -----------------------------
@pytest.mark.slurm
def test_sbatch_metrics_script_equals_local_run(slurm_cluster, clustering_root, tmp_path):
    common = [f"run.root={clustering_root}", "metrics.block_rows=64", "metrics.levels=[1,2]"]
    local = run_job("toy", *common, f"metrics.output_dir={tmp_path / 'local'}")
    assert local.returncode == 0, local.stderr
    log = tmp_path / "slurm.out"
    job = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", "--time=00:10:00",
         "jobs/metrics.slurm", "toy", *common, f"metrics.output_dir={tmp_path / 'slurm'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip().split(";")[0]  # fmt: skip
    deadline = time.time() + 300
    try:
        while subprocess.run(
            ["squeue", "-h", "-j", job], capture_output=True, text=True
        ).stdout.strip():
            assert time.time() < deadline, f"job {job} still queued after 300 s"
            time.sleep(1)
    finally:
        if time.time() >= deadline:
            subprocess.run(["scancel", job], check=False)  # our own job only
    state = ""
    for _ in range(60):  # sacct lags the scheduler
        state = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"], capture_output=True, text=True
        ).stdout.strip()
        if state and state not in ("PENDING", "RUNNING"):
            break
        time.sleep(0.5)
    text = log.read_text() if log.exists() else ""
    assert state == "COMPLETED", f"job {job}: {state}\n{text}"
    assert "tasks=2" in text and "Cluster metrics" in text
    for level in (1, 2):
        a = json.loads((tmp_path / "local" / f"level{level}" / "metrics.json").read_text())
        b = json.loads((tmp_path / "slurm" / f"level{level}" / "metrics.json").read_text())
        assert (a["world_size"], b["world_size"]) == (1, 2)
        for key in ("silhouette", "davies_bouldin", "calinski_harabasz", "inertia",
                    "simplified_silhouette", "n_clusters", "n_points"):  # fmt: skip
            assert b[key] == pytest.approx(a[key], rel=1e-9), key


def test_pipeline_stage_job_with_two_ranks(tmp_path):
    """The stage entry point (--run-dir/--stage) on a run dir whose plan has a k-means level
    (stand-in for the kmeans stage: its marker is the one run_hierarchy wrote)."""
    from omegaconf import OmegaConf

    from lib.config import EmbedfleetConfig
    from lib.markers import marker_path, read_marker
    from lib.metrics_stage import metrics_stages
    from lib.pipeline import DISTRIBUTED, Plan, StageSpec
    from tests.dist_helpers import free_port

    run = tmp_path / "run"
    make_clustering(run, n=300)
    km_hash = read_marker(marker_path(run, "kmeans/level1", 0)).config_hash
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
            [sys.executable, "-m", "jobs.metrics", "--run-dir", str(run), "--stage", "metrics_level1"],
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
    marker = read_marker(marker_path(run, "metrics/level1", 0))
    assert marker.config_hash == specs[0].config_hash
    assert {Path(o.path).name for o in marker.outputs} == {
        "metrics.json", "per_cluster.parquet", "examples.json"
    }  # fmt: skip
