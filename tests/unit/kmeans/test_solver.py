"""k-means library: agreement with scikit-learn, seeded distribution, precision paths."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.datasets import make_blobs

from lib.compute.comm import Comm
from lib.core.errors import ConfigError
from lib.formats.arrays import open_embeddings, save_npy
from lib.kmeans.params import KmeansParams
from lib.kmeans.solver import PointSet, assign, kmeans
from tests.dist_helpers import run_world


def solve(points, k, params=None, **kwargs):
    """``kmeans`` with ``k`` clusters and the solver settings ``params`` (or defaults)."""
    return kmeans(points, k, params or KmeansParams(), **kwargs)


def overlapping_blobs(n: int = 3000, dim: int = 16, centers: int = 20, seed: int = 0):
    x, _ = make_blobs(n, n_features=dim, centers=centers, cluster_std=3.0, random_state=seed)
    return x


@pytest.mark.parametrize("bounds", [False, True], ids=["dense", "hamerly"])
def test_lloyd_matches_sklearn_from_same_centroids(bounds):
    x = overlapping_blobs()
    init = x[np.random.default_rng(0).choice(len(x), 20, replace=False)]
    params = KmeansParams(n_iters=25, compute_dtype="float64", bounds=bounds)
    ours = solve(PointSet(x), 20, params, init_centroids=init)
    ref = KMeans(20, init=init, n_init=1, algorithm="lloyd", max_iter=25, tol=0).fit(x)
    assert ours.n_iters >= 5  # the data does not converge at once: the loop was exercised
    np.testing.assert_array_equal(ours.assignment, ref.labels_)
    assert abs(ours.inertia - ref.inertia_) <= 1e-6 * ref.inertia_
    np.testing.assert_allclose(ours.centroids, ref.cluster_centers_, rtol=0, atol=1e-9)
    # sq_distances are this rank's exact distances and sum to the inertia
    assert ours.sq_distances.sum() == pytest.approx(ours.inertia, rel=1e-12)


def test_float32_bounds_and_dense_agree():
    x = overlapping_blobs(n=4000, dim=32, centers=30, seed=1).astype(np.float32)
    p = KmeansParams(n_iters=30, seed=5)
    dense = solve(PointSet(x), 30, replace(p, bounds=False))
    pruned = solve(PointSet(x), 30, replace(p, bounds=True))
    np.testing.assert_array_equal(dense.init_ids, pruned.init_ids)
    np.testing.assert_array_equal(dense.assignment, pruned.assignment)
    assert pruned.inertia == pytest.approx(dense.inertia, rel=1e-9)
    searched = [h["searched"] for h in pruned.history]
    assert sum(searched) < 0.8 * len(x) * len(searched)  # the bounds did skip work


def test_kmeanspp_inertia_close_to_sklearn():
    x, _ = make_blobs(4000, n_features=8, centers=25, cluster_std=0.4, random_state=3)
    x = x.astype(np.float32)
    ours_init, ours_final, ref_init, ref_final = [], [], [], []
    for seed in range(3):
        init_only = solve(PointSet(x), 25, KmeansParams(n_iters=0, seed=seed))
        ours_init.append(init_only.inertia)
        ours_final.append(solve(PointSet(x), 25, KmeansParams(n_iters=20, seed=seed)).inertia)
        centres, _ = kmeans_plusplus(x, 25, random_state=seed)
        ref_init.append(((x[:, None, :] - centres[None]) ** 2).sum(-1).min(1).sum())
        ref_final.append(
            KMeans(25, init="k-means++", n_init=1, max_iter=20, random_state=seed).fit(x).inertia_
        )
    assert np.mean(ours_init) <= 1.05 * np.mean(ref_init)
    assert np.mean(ours_final) <= 1.05 * np.mean(ref_final)


def test_same_seed_same_result_and_random_init():
    x = overlapping_blobs(n=1500).astype(np.float32)
    a = solve(PointSet(x), 12, KmeansParams(n_iters=10, seed=7, init="random"))
    b = solve(PointSet(x), 12, KmeansParams(n_iters=10, seed=7, init="random"))
    c = solve(PointSet(x), 12, KmeansParams(n_iters=10, seed=8, init="random"))
    np.testing.assert_array_equal(a.init_ids, b.init_ids)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert len(set(a.init_ids.tolist())) == 12
    assert not np.array_equal(a.init_ids, c.init_ids)


def test_chunking_and_storage_do_not_change_the_result(tmp_path):
    x = overlapping_blobs(n=2000).astype(np.float32)
    base = solve(PointSet(x), 10, KmeansParams(n_iters=15, seed=2))
    small = solve(PointSet(x), 10, KmeansParams(n_iters=15, seed=2, chunk_rows=97))
    np.testing.assert_array_equal(base.assignment, small.assignment)
    np.testing.assert_allclose(base.centroids, small.centroids, rtol=1e-12)
    # A memmap from disk (zero-copy) and a subset of a larger matrix give the same answer.
    save_npy(tmp_path / "x.npy", x)
    mm = solve(PointSet(open_embeddings(tmp_path / "x.npy")), 10, KmeansParams(n_iters=15, seed=2))
    np.testing.assert_array_equal(base.assignment, mm.assignment)
    big = np.concatenate([x, np.zeros((500, x.shape[1]), np.float32)])[np.r_[0:2000, 2000:2500]]
    subset = solve(PointSet(big, np.arange(2000)), 10, KmeansParams(n_iters=15, seed=2))
    np.testing.assert_array_equal(base.assignment, subset.assignment)


@pytest.mark.parametrize("bounds", [False, True], ids=["dense", "hamerly"])
def test_streamed_float16_shard_matches_in_memory(tmp_path, bounds):
    x16 = overlapping_blobs(n=3000).astype(np.float16)
    save_npy(tmp_path / "x16.npy", x16)
    p = KmeansParams(n_iters=10, seed=4, chunk_rows=500, bounds=bounds)
    memory = solve(PointSet(x16.astype(np.float32)), 12, p)
    streamed = solve(PointSet(open_embeddings(tmp_path / "x16.npy")), 12, replace(p, cache_bytes=0))
    cached = solve(PointSet(open_embeddings(tmp_path / "x16.npy")), 12, p)
    for other in (streamed, cached):
        np.testing.assert_array_equal(memory.init_ids, other.init_ids)
        np.testing.assert_array_equal(memory.assignment, other.assignment)
        np.testing.assert_allclose(memory.centroids, other.centroids, rtol=1e-12)
    # a streamed subset (gathered rows come from the memmap) agrees with the copied subset
    keep = np.arange(0, 3000, 2)
    sub = solve(
        PointSet(open_embeddings(tmp_path / "x16.npy"), keep), 12, replace(p, cache_bytes=0)
    )
    ref = solve(PointSet(x16[keep].astype(np.float32)), 12, p)
    np.testing.assert_array_equal(sub.assignment, ref.assignment)


def test_empty_cluster_keeps_its_centroid(caplog):
    x = overlapping_blobs(n=1000, dim=4, centers=3)
    init = np.concatenate([x[:3], np.full((1, 4), 1e6)])  # the last centre attracts nobody
    with caplog.at_level("INFO", logger="lib.kmeans.lloyd"):
        res = solve(
            PointSet(x), 4, KmeansParams(n_iters=5, compute_dtype="float64"), init_centroids=init
        )
    np.testing.assert_array_equal(res.centroids[3], init[3])
    assert res.n_empty == 1 and 3 not in set(res.assignment.tolist())
    assert "1 empty clusters kept their previous centroid" in caplog.text


def test_tolerance_stops_early_like_sklearn():
    x = overlapping_blobs(n=3000)
    init = x[:20]
    fixed = solve(
        PointSet(x), 20, KmeansParams(n_iters=40, compute_dtype="float64"), init_centroids=init
    )
    early = solve(
        PointSet(x),
        20,
        KmeansParams(n_iters=40, tol=0.05, compute_dtype="float64"),
        init_centroids=init,
    )
    ref = KMeans(20, init=init, n_init=1, algorithm="lloyd", max_iter=40, tol=0.05).fit(x)
    assert early.converged and early.n_iters < fixed.n_iters
    assert early.n_iters == ref.n_iter_
    np.testing.assert_array_equal(early.assignment, ref.labels_)
    assert early.inertia >= fixed.inertia


def test_assign_returns_nearest_centroid():
    x = overlapping_blobs(n=500).astype(np.float32)
    c = x[:7].astype(np.float64)
    a, sq, rows = assign(PointSet(x), c)
    d = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(a, d.argmin(1))
    np.testing.assert_allclose(sq, d.min(1), rtol=1e-5)  # float32 difference, float64 sum
    assert rows == (0, 500)


def test_faiss_backend_runs_and_refuses_distributed():
    x = overlapping_blobs(n=3000).astype(np.float32)
    init = x[np.random.default_rng(0).choice(len(x), 20, replace=False)]
    ours = solve(PointSet(x), 20, KmeansParams(n_iters=20), init_centroids=init)
    fa = solve(PointSet(x), 20, KmeansParams(n_iters=20, backend="faiss"), init_centroids=init)
    assert fa.inertia == pytest.approx(ours.inertia, rel=0.01)
    own = solve(PointSet(x), 20, KmeansParams(n_iters=20, backend="faiss", init="faiss"))
    assert own.centroids.shape == (20, 16)
    with pytest.raises(ConfigError, match=r"single CPU process.*world size 2"):
        solve(PointSet(x), 20, KmeansParams(backend="faiss"), comm=Comm(rank=0, world=2))


def test_bad_parameters_are_config_errors():
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(ConfigError, match="larger than the number of points"):
        solve(PointSet(x), 11)
    with pytest.raises(ConfigError, match="init must be one of"):
        solve(PointSet(x), 2, KmeansParams(init="kmeans||"))
    with pytest.raises(ConfigError, match="accumulation"):
        solve(PointSet(x), 2, KmeansParams(dtype="int8"))


# The CUDA path: tests/gpu/test_kmeans_cuda.py (pytest -m gpu on a GPU machine).


# -- distributed: world size 2 == world size 1 ---------------------------------------------
def _world_kmeans(path: str) -> dict:
    points = PointSet(open_embeddings(path))
    out = {}
    for name, params in {
        "pp_bounds": KmeansParams(n_iters=12, seed=11),
        "pp_dense": KmeansParams(n_iters=12, seed=11, bounds=False),
        "random": KmeansParams(n_iters=12, seed=4, init="random"),
    }.items():
        res = solve(points, 16, params)
        out[name] = (res.row_range, res.assignment, res.centroids, res.init_ids, res.inertia)
    return out


def test_world_size_two_equals_one(tmp_path):
    x = overlapping_blobs(n=2001, dim=8, centers=16, seed=5).astype(np.float32)
    save_npy(tmp_path / "x.npy", x)
    (one,) = run_world(_world_kmeans, 1, str(tmp_path / "x.npy"))
    two = run_world(_world_kmeans, 2, str(tmp_path / "x.npy"))
    for name, (rows, assignment, centroids, ids, inertia) in one.items():
        assert rows == (0, 2001)
        r0, r1 = two[0][name], two[1][name]
        assert r0[0] == (0, 1001) and r1[0] == (1001, 2001)
        np.testing.assert_array_equal(ids, r0[3])
        np.testing.assert_array_equal(ids, r1[3])
        np.testing.assert_array_equal(assignment, np.concatenate([r0[1], r1[1]]))
        np.testing.assert_allclose(centroids, r0[2], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(r0[2], r1[2])  # identical on every rank
        assert r0[4] == r1[4] and r0[4] == pytest.approx(inertia, rel=1e-12)
