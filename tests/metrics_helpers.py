"""Shared by the metrics tests: blobs, scikit-learn references, a real clustering on disk
and runners of ``python -m jobs.metrics``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn import metrics as skm
from sklearn.datasets import make_blobs

from lib.formats.arrays import save_npy
from lib.kmeans.hierarchy import run_hierarchy
from lib.kmeans.params import KmeansParams
from tests.conftest import REPO

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


def make_clustering(run_dir: Path, n=600, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A run dir with merge/ outputs and a 2-level hierarchical k-means (10 -> 3)."""
    X, y = blobs(n=n, centers=6, seed=seed, dtype=np.float32)
    (run_dir / "merge").mkdir(parents=True, exist_ok=True)
    save_npy(run_dir / "merge" / "embeddings.npy", X)
    texts = [f"row {i} of blob {y[i]}" for i in range(n)]
    pq.write_table(
        pa.table({"id": [str(i) for i in range(n)], "text": texts}),
        run_dir / "merge" / "metadata.parquet",
        row_group_size=128,
    )
    params = KmeansParams(
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


def composed_labels(run_dir: Path) -> dict[int, np.ndarray]:
    a1 = np.load(run_dir / "kmeans/level1/step0/assignment.npy")
    a2 = np.load(run_dir / "kmeans/level2/step0/assignment.npy")
    return {1: a1, 2: a2[a1]}


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
