"""Balanced hierarchical sampling: water-filling, exact sizes, balance, curated outputs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib.core.errors import ConfigError, ConfigMismatchError, DatasetError
from lib.curate.params import CurateParams
from lib.curate.sampling import (
    ClusterTree,
    allocate,
    curated_metadata,
    hierarchical_sample,
    water_fill,
    write_curated,
)
from lib.formats.arrays import load_npy, save_npy
from lib.kmeans.hierarchy import run_hierarchy
from lib.kmeans.params import KmeansParams


def fill_level(cap: np.ndarray, target: int) -> int:
    """The largest x with sum(min(x, cap)) <= target, by brute force."""
    x = 0
    while x < cap.max() and np.minimum(x + 1, cap).sum() <= target:
        x += 1
    return x


def assert_balanced(counts: np.ndarray, cap: np.ndarray) -> None:
    """Shares differ by at most 1, except where a cluster is exhausted (count == cap)."""
    open_ = counts < cap
    if open_.any():
        assert counts.max() <= counts[open_].min() + 1


@pytest.mark.parametrize("seed", range(6))
def test_water_fill_matches_its_definition(seed):
    rng = np.random.default_rng(seed)
    cap = rng.integers(0, 40, size=rng.integers(1, 30))
    for target in {0, 1, int(cap.sum()) // 3, int(cap.sum()) - 1, int(cap.sum())}:
        target = max(target, 0)
        counts = water_fill(cap, np.array([0, len(cap)]), np.array([target]), rng)
        assert counts.sum() == target and (counts <= cap).all() and (counts >= 0).all()
        x = fill_level(cap, target)
        base = np.minimum(x, cap)
        assert ((counts == base) | (counts == base + 1)).all()
        assert_balanced(counts, cap)


def test_water_fill_groups_are_independent():
    rng = np.random.default_rng(1)
    cap = rng.integers(0, 20, size=50)
    offsets = np.array([0, 10, 10, 31, 50])
    targets = np.array([30, 0, 100, 17])
    counts = water_fill(cap, offsets, targets, rng)
    for g in range(4):
        part, c = cap[offsets[g] : offsets[g + 1]], counts[offsets[g] : offsets[g + 1]]
        assert c.sum() == targets[g]
        if len(part):
            x = fill_level(part, int(targets[g]))
            assert ((c == np.minimum(x, part)) | (c == np.minimum(x, part) + 1)).all()


def random_tree(rng: np.random.Generator, n: int = 5000, ks=(200, 30, 5)) -> ClusterTree:
    """A 3-level hierarchy with uneven cluster sizes (some level-1 clusters empty)."""
    levels = []
    n_points = n
    for k in ks:
        weights = rng.pareto(1.0, size=k) + 0.01
        labels = rng.choice(k, size=n_points, p=weights / weights.sum())
        order = np.lexsort((rng.random(n_points), labels))
        offsets = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=k))])
        levels.append((offsets, order.astype(np.int64)))
        n_points = k
    return ClusterTree(levels)


@pytest.mark.parametrize("strategy", ["r", "c"])
def test_exact_size_balanced_no_duplicates(strategy):
    rng = np.random.default_rng(7)
    tree = random_tree(rng)
    flat = tree.flat_sizes()
    for target in (1, 137, 2000, 4999, 5000):
        params = CurateParams(target, strategy=strategy, seed=3)
        rows = hierarchical_sample(tree, params)
        assert len(rows) == target
        assert len(np.unique(rows)) == target  # no duplicates without the multiplier
        shares = allocate(tree, params, np.random.default_rng(3))
        assert_balanced(shares[-1], flat[-1])
        for level in range(len(tree.levels) - 1, 0, -1):
            offsets, members = tree.levels[level]
            for c in range(len(offsets) - 1):
                children = members[offsets[c] : offsets[c + 1]]
                assert shares[level - 1][children].sum() == shares[level][c]
                assert_balanced(shares[level - 1][children], flat[level - 1][children])
        # the rows drawn from each level-1 cluster are exactly its share
        offsets, members = tree.levels[0]
        cluster_of_row = np.empty(5000, dtype=np.int64)
        cluster_of_row[members] = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        np.testing.assert_array_equal(
            np.bincount(cluster_of_row[rows], minlength=len(offsets) - 1), shares[0]
        )
        if strategy == "c":
            for c in np.nonzero(shares[0])[0]:
                nearest = members[offsets[c] : offsets[c] + shares[0][c]]
                assert set(nearest.tolist()) <= set(rows.tolist())


def test_multiplier_repeats_small_clusters():
    rng = np.random.default_rng(2)
    tree = random_tree(rng, n=1000, ks=(40, 6))
    flat = tree.flat_sizes()
    params = CurateParams(1800, multiplier=3, seed=1)
    rows = hierarchical_sample(tree, params)
    assert len(rows) == 1800
    counts = np.bincount(rows, minlength=1000)
    assert counts.max() <= 3 and counts.max() > 1
    shares = allocate(tree, params, np.random.default_rng(1))
    assert (shares[0] <= 3 * flat[0]).all()
    small = np.nonzero((shares[0] == 3 * flat[0]) & (flat[0] > 0))[0]
    assert len(small)  # some clusters were repeated in full
    offsets, members = tree.levels[0]
    for c in small:
        assert (counts[members[offsets[c] : offsets[c + 1]]] == 3).all()


def test_same_seed_same_rows_and_too_large_target():
    tree = random_tree(np.random.default_rng(4), n=800, ks=(30, 4))
    a = hierarchical_sample(tree, CurateParams(300, seed=9))
    b = hierarchical_sample(tree, CurateParams(300, seed=9))
    c = hierarchical_sample(tree, CurateParams(300, seed=10))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ConfigError, match=r"target_size=801 exceeds the 800 points"):
        hierarchical_sample(tree, CurateParams(801))
    with pytest.raises(ConfigError, match="multiplier must be >= 1"):
        hierarchical_sample(tree, CurateParams(10, multiplier=0))


def test_curated_outputs_from_a_real_hierarchy(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(scale=3, size=(12, 8))[rng.integers(0, 12, 1200)] + rng.normal(size=(1200, 8))
    save_npy(tmp_path / "emb.npy", x.astype(np.float32))
    params = KmeansParams(2, [24, 5], [2, 1], [6, 3], [1, 1], n_iters=10, seed=1)
    run_hierarchy(tmp_path, params, tmp_path / "emb.npy")
    meta = pa.table(
        {
            "row_index": np.arange(1200, dtype=np.int64) * 2 + 1,  # rows were dropped upstream
            "id": [f"doc{i}" for i in range(1200)],
            "source": ["web" if i % 3 else "books" for i in range(1200)],
        }
    )
    pq.write_table(meta, tmp_path / "metadata.parquet")
    rows = write_curated(
        tmp_path,
        2,
        CurateParams(500, strategy="c", seed=2),
        metadata=tmp_path / "metadata.parquet",
    )
    cur = tmp_path / "kmeans/curated"
    np.testing.assert_array_equal(load_npy(cur / "embedding_rows.npy"), rows)
    assert len(rows) == 500 and len(np.unique(rows)) == 500
    table = pq.read_table(cur / "metadata.parquet")
    assert table.column_names == ["row_index", "id", "source", "embedding_row"]
    np.testing.assert_array_equal(table.column("embedding_row").to_numpy(), rows)
    np.testing.assert_array_equal(table.column("row_index").to_numpy(), rows * 2 + 1)
    assert table.column("id").to_pylist()[:2] == [f"doc{r}" for r in rows[:2]]
    np.testing.assert_array_equal(load_npy(cur / "dataset_rows.npy"), rows * 2 + 1)
    marker = json.loads((cur / "completions/task_00000.json").read_text())
    assert marker["counts"] == {"rows": 500, "unique_rows": 500}
    assert {o["path"] for o in marker["outputs"]} >= {
        "kmeans/curated/embedding_rows.npy",
        "kmeans/curated/metadata.parquet",
    }
    # a relaunch returns the published rows; other settings in the same run dir are refused
    stamp = (cur / "completions/task_00000.json").stat().st_mtime_ns
    again = write_curated(
        tmp_path,
        2,
        CurateParams(500, strategy="c", seed=2),
        metadata=tmp_path / "metadata.parquet",
    )
    np.testing.assert_array_equal(again, rows)
    assert (cur / "completions/task_00000.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigMismatchError):
        write_curated(tmp_path, 2, CurateParams(500, seed=3))


def test_bad_metadata(tmp_path):
    pq.write_table(pa.table({"row_index": [0, 1], "id": ["a", "b"]}), tmp_path / "m.parquet")
    with pytest.raises(DatasetError, match=r"missing columns \['source'\]"):
        curated_metadata(np.array([0]), tmp_path / "m.parquet")
    pq.write_table(
        pa.table({"row_index": [0, 1], "id": ["a", "b"], "source": ["s", "s"]}),
        tmp_path / "short.parquet",
    )
    with pytest.raises(DatasetError, match="different merges"):
        curated_metadata(np.array([0, 5]), tmp_path / "short.parquet")
    with pytest.raises(DatasetError, match="does not exist"):
        curated_metadata(np.array([0]), tmp_path / "none.parquet")
