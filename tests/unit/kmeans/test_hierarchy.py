"""Hierarchical k-means levels: outputs, resampling, split mode, resume after a kill,
world size 2 == 1, and bad input that must fail before anything looks complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from lib.core.errors import (
    ConfigError,
    ConfigMismatchError,
    DatasetError,
    UpstreamIncompleteError,
)
from lib.core.paths import RunPaths
from lib.formats.arrays import ArrayFormatError, create_memmap, load_npy, save_npy
from lib.formats.clusters import StepOutputs, load_level
from lib.kmeans.hierarchy import run_hierarchy, run_level
from lib.kmeans.params import KmeansParams
from lib.kmeans.resample import resample_points
from tests.conftest import REPO
from tests.dist_helpers import run_world

ROOT = REPO

PARAMS = KmeansParams(
    n_levels=2,
    n_clusters=[20, 4],
    n_resampling_steps=[3, 1],
    sample_size=[8, 3],
    n_splits=[1, 1],
    n_iters=15,
    seed=3,
)
SPLIT = replace(PARAMS, n_clusters=[6, 4], n_resampling_steps=[1, 1], n_splits=[5, 1])


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(30, 8))
    x = centres[rng.integers(0, 30, 3000)] + rng.normal(size=(3000, 8))
    path = tmp_path_factory.mktemp("emb") / "embeddings.npy"
    save_npy(path, x.astype(np.float32))
    return path


def step_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    """Every published array under run_dir/kmeans, by relative path."""
    out = {}
    for f in sorted((run_dir / "kmeans").rglob("*.npy")):
        out[str(f.relative_to(run_dir))] = np.load(f)
    return out


def nothing_complete(run_dir: Path) -> bool:
    kdir = run_dir / "kmeans"
    return not list(kdir.rglob("completions/*.json")) and not list(kdir.rglob("final.json"))


def check_step(step: StepOutputs, n_points: int, data: np.ndarray, nearest: bool = True) -> None:
    centroids = step.centroids()
    assignment = step.assignment()
    offsets, members = step.members()
    dist = step.distances()
    k = len(centroids)
    assert assignment.shape == (n_points,) and members.shape == (n_points,)
    assert offsets[0] == 0 and offsets[-1] == n_points and len(offsets) == k + 1
    np.testing.assert_array_equal(np.diff(offsets), np.bincount(assignment, minlength=k))
    np.testing.assert_array_equal(np.sort(members), np.arange(n_points))
    for c in range(k):
        mem = members[offsets[c] : offsets[c + 1]]
        assert (assignment[mem] == c).all()
        assert (np.diff(dist[mem]) >= 0).all()  # nearest first
    # the assignment is the nearest centroid and distances are squared L2
    d = ((data[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    if nearest:
        assert (d[np.arange(n_points), assignment] <= d.min(1) * (1 + 1e-5) + 1e-6).all()
    np.testing.assert_allclose(dist, d[np.arange(n_points), assignment], rtol=1e-4, atol=1e-4)
    for f in (Path(step.storage.root) / step.dir).glob("*.npy"):
        assert f.with_name(f.name + ".json").exists()  # sidecar


def test_two_levels_with_resampling(tmp_path, embeddings):
    results = run_hierarchy(tmp_path, PARAMS, embeddings)
    assert [r.step for r in results] == ["step2", "step0"]
    x = np.load(embeddings)
    run = RunPaths(tmp_path)
    final1, out1 = load_level(run, 1)
    assert final1["step"] == "step2" and final1["n_clusters"] == 20
    for s in range(3):
        check_step(StepOutputs.at(run, 1, f"step{s}"), 3000, x)
    # resampling steps clustered a sample of <= sample_size points per previous cluster
    step0 = StepOutputs.at(run, 1, "step0")
    offsets, _ = step0.members()
    sample = load_npy(tmp_path / "kmeans/level1/step1/sample.npy")
    per_cluster = np.bincount(step0.assignment()[sample], minlength=20)
    np.testing.assert_array_equal(per_cluster, np.minimum(np.diff(offsets), 8))
    assert len(np.unique(sample)) == len(sample)
    # level 2 clusters the 20 centroids of level 1's final step
    final2, out2 = load_level(run, 2)
    assert final2["n_points"] == 20 and final2["n_clusters"] == 4
    check_step(out2, 20, out1.centroids())
    marker = json.loads((tmp_path / out2.dir / "completions/task_00000.json").read_text())
    assert (marker["stage"], marker["part"]) == ("kmeans_level2", "step0")
    assert marker["counts"]["clusters"] == 4
    level_marker = json.loads((tmp_path / "kmeans/level1/completions/task_00000.json").read_text())
    assert level_marker["extra"]["final_step"] == "step2"
    assert "kmeans/level1/step2/members.npy" in {o["path"] for o in level_marker["outputs"]}
    # it lists every step's marker (what storage=sync's pull brings besides its outputs)
    steps = [f"kmeans/level1/step{s}/completions/task_00000.json" for s in range(3)]
    assert level_marker["checkpoints"] == steps and all((tmp_path / n).exists() for n in steps)
    # a relaunch skips finished levels and changes nothing (and completes a level marker
    # lost to a kill between final.json and the marker)
    (tmp_path / "kmeans/level2/completions/task_00000.json").unlink()
    before = step_arrays(tmp_path)
    again = run_hierarchy(tmp_path, PARAMS, embeddings)
    assert all(r.skipped for r in again)
    after = step_arrays(tmp_path)
    assert (tmp_path / "kmeans/level2/completions/task_00000.json").exists()
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


def test_closest_sampling_takes_nearest_members():
    offsets = np.array([0, 3, 3, 8])
    members = np.array([5, 1, 9, 4, 2, 7, 0, 3])
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(resample_points(offsets, members, 2, "c", rng), [1, 2, 4, 5])
    r = resample_points(offsets, members, 2, "r", rng)
    assert len(r) == 4 and set(r[:]) <= set(members) and len(set(r)) == 4
    assert len(set(r) & {5, 1, 9}) == 2 and len(set(r) & {4, 2, 7, 0, 3}) == 2


def test_split_mode(tmp_path, embeddings):
    results = run_hierarchy(tmp_path, SPLIT, embeddings)
    assert results[0].step == "split"
    run = RunPaths(tmp_path)
    pre_offsets, pre_members = StepOutputs.at(run, 1, "step0").members()
    final, out = load_level(run, 1)
    k = final["n_clusters"]
    assert 6 < k <= 30
    x = np.load(embeddings).astype(np.float64)
    check_step(out, 3000, x, nearest=False)
    # every final cluster lies inside one pre-cluster, and each point is at its nearest
    # sub-centroid among those of its pre-cluster
    assignment, centroids = out.assignment(), out.centroids().astype(np.float64)
    pre_of_point = np.empty(3000, dtype=np.int64)
    for c in range(6):
        pre_of_point[pre_members[pre_offsets[c] : pre_offsets[c + 1]]] = c
    pre_of_cluster = np.array([np.unique(pre_of_point[assignment == c]) for c in range(k)])
    assert pre_of_cluster.shape == (k, 1)
    for c in range(6):
        pts = np.nonzero(pre_of_point == c)[0]
        subs = np.nonzero(pre_of_cluster[:, 0] == c)[0]
        assert 1 <= len(subs) <= 5
        d = ((x[pts, None, :] - centroids[None, subs]) ** 2).sum(-1)
        np.testing.assert_array_equal(subs[d.argmin(1)], assignment[pts])
    assert load_level(run, 2)[0]["n_points"] == k


def test_world_size_two_equals_one(tmp_path, embeddings):
    for world in (1, 2):
        run_world(_world_hierarchy, world, str(tmp_path / f"w{world}"), str(embeddings))
    for name in ("resample", "split"):
        one = step_arrays(tmp_path / "w1" / name)
        two = step_arrays(tmp_path / "w2" / name)
        assert one.keys() == two.keys() and len(one) > 10
        for key in one:
            if "centroids" in key:
                np.testing.assert_allclose(one[key], two[key], rtol=1e-6)
            else:
                np.testing.assert_array_equal(one[key], two[key], err_msg=key)


def _world_hierarchy(run_dir: str, embeddings: str) -> None:
    run_hierarchy(Path(run_dir) / "resample", PARAMS, embeddings)
    run_hierarchy(Path(run_dir) / "split", SPLIT, embeddings)


KILLED_LEVEL = """
import json, sys, time
from lib.kmeans.hierarchy import run_level
from lib.kmeans.params import KmeansParams

def pause(level, step):
    if step == "step0":
        print("step0 published", flush=True)
        time.sleep(120)

params = KmeansParams(**json.loads(sys.argv[3]))
run_level(sys.argv[1], 1, params, embeddings_path=sys.argv[2], on_step_done=pause)
"""


def test_kill_mid_level_then_relaunch_equals_uninterrupted(tmp_path, embeddings):
    params = replace(
        PARAMS, n_levels=1, n_clusters=[20], n_resampling_steps=[3], sample_size=[8], n_splits=[1]
    )
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_LEVEL,
            str(killed),
            str(embeddings),
            json.dumps(asdict(params)),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "step0 published"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    level = killed / "kmeans/level1"
    assert (level / "step0/completions/task_00000.json").exists()
    assert not (level / "step1/completions").exists() and not (level / "final.json").exists()

    resumed = run_level(killed, 1, params, embeddings_path=embeddings)
    assert resumed.steps[0]["skipped"] and not resumed.steps[1]["skipped"]
    clean = tmp_path / "clean"
    run_level(clean, 1, params, embeddings_path=embeddings)
    a, b = step_arrays(killed), step_arrays(clean)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert json.loads((level / "final.json").read_text())["step"] == "step2"


def test_changed_settings_in_the_same_run_dir_are_refused(tmp_path, embeddings):
    small = replace(
        PARAMS, n_levels=1, n_clusters=[5], n_resampling_steps=[1], sample_size=[2], n_splits=[1]
    )
    run_level(tmp_path, 1, small, embeddings_path=embeddings)
    with pytest.raises(ConfigMismatchError, match="different configuration"):
        run_level(tmp_path, 1, replace(small, n_iters=3), embeddings_path=embeddings)
    assert (tmp_path / "kmeans/level1/final.json").exists()  # the finished level is kept


# -- bad input: a clear error, and nothing that looks complete ------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_clusters": [20]}, r"n_clusters has 1 entries \[20\] but n_levels=2"),
        ({"sample_size": [0, 3]}, r"sample_size\[0\] \(level 1\) must be >= 1, got 0"),
        ({"n_splits": [4, 1]}, r"n_splits=4 \(split mode\) cannot be combined"),
        ({"n_clusters": [3001, 4]}, r"n_clusters=3001 is larger than the number of points"),
        ({"sampling_strategy": "x"}, r"sampling_strategy must be 'r' \(random\) or 'c'"),
    ],
)
def test_bad_config(tmp_path, embeddings, change, message):
    with pytest.raises(ConfigError, match=message):
        run_level(tmp_path, 1, replace(PARAMS, **change), embeddings_path=embeddings)
    assert not (tmp_path / "kmeans").exists() or nothing_complete(tmp_path)


def test_params_from_a_config_mapping():
    cfg = {**asdict(PARAMS), "n_clusters": (20, 4)}
    assert KmeansParams.from_mapping(cfg) == PARAMS
    with pytest.raises(ConfigError, match=r"unknown kmeans settings \['n_cluster'\]"):
        KmeansParams.from_mapping({**cfg, "n_cluster": [1, 2]})
    cfg.pop("n_levels")  # null: one level per entry of n_clusters
    assert KmeansParams.from_mapping(cfg).levels() == 2


def test_missing_embeddings(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.npy does not exist"):
        run_level(tmp_path, 1, PARAMS, embeddings_path=tmp_path / "nope.npy")
    assert not (tmp_path / "kmeans").exists()


def test_wrongly_shaped_embeddings(tmp_path):
    save_npy(tmp_path / "flat.npy", np.zeros(100, np.float32))
    with pytest.raises(ArrayFormatError, match="must be 2-D"):
        run_level(tmp_path, 1, PARAMS, embeddings_path=tmp_path / "flat.npy")
    raw = create_memmap(tmp_path / "emb.bin", (100, 8), "float32")
    del raw
    with open(tmp_path / "emb.bin", "r+b") as fh:
        fh.truncate(1000)  # a truncated copy
    with pytest.raises(ArrayFormatError, match="truncated or foreign"):
        run_level(tmp_path, 1, PARAMS, embeddings_path=tmp_path / "emb.bin")
    assert not (tmp_path / "kmeans").exists()


def test_nan_rows_are_named(tmp_path, embeddings):
    x = np.load(embeddings)
    x[[17, 2500], 3] = np.nan
    x[40, 0] = np.inf
    save_npy(tmp_path / "bad.npy", x)
    with pytest.raises(DatasetError, match=r"3 rows contain NaN or Inf \(rows \[17, 40, 2500\]"):
        run_level(tmp_path, 1, PARAMS, embeddings_path=tmp_path / "bad.npy")
    assert not (tmp_path / "kmeans").exists() or nothing_complete(tmp_path)


def test_level_two_needs_level_one(tmp_path):
    with pytest.raises(UpstreamIncompleteError, match="level 1 has not finished"):
        run_level(tmp_path, 2, PARAMS)
