"""The checked-in ``jobs/metrics.slurm`` on the real test SLURM cluster equals the local run."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.metrics_helpers import make_clustering, run_job

pytestmark = [pytest.mark.slurm]


@pytest.fixture(scope="module")
def clustering_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_clustering(root / "toy")
    return root


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
