"""What the index stage chooses from the data: kind, nlist, training sample, metric."""

from __future__ import annotations

import pytest

from lib.core.errors import ConfigError
from lib.index.choice import (
    choose_kind,
    choose_layout,
    choose_metric,
    choose_nlist,
    choose_nprobe,
    choose_pq_m,
    choose_train_size,
)
from lib.index.params import IndexParams


def test_auto_is_exact_below_the_threshold_and_ivf_from_it():
    assert choose_kind("auto", 99_999, 100_000) == "flat"
    assert choose_kind("auto", 100_000, 100_000) == "ivf_flat"
    assert choose_kind("auto", 5, 3) == "ivf_flat"
    for kind in ("flat", "ivf_flat", "ivf_pq", "hnsw"):
        assert choose_kind(kind, 10**7, 100_000) == kind


def test_nlist_is_about_four_square_roots_and_never_more_than_the_rows():
    assert choose_nlist(None, 1_000_000) == 4000
    assert choose_nlist(None, 200_000) == 1789
    assert choose_nlist(None, 10) == 10  # 4 sqrt(10) = 12.6 > 10 rows
    assert choose_nlist(None, 1) == 1
    assert choose_nlist(64, 1000) == 64
    with pytest.raises(ConfigError, match=r"index.nlist=2000 is more than the 1000 vectors"):
        choose_nlist(2000, 1000)


def test_training_sample_and_nprobe_defaults():
    assert choose_train_size(None, 4000, 1_000_000) == 160_000  # 40 a list
    assert choose_train_size(None, 100, 1000) == 1000  # never more than the rows
    assert choose_train_size(5000, 100, 1_000_000) == 5000
    with pytest.raises(ConfigError, match="index.train_size=50 is below index.nlist=100"):
        choose_train_size(50, 100, 1000)
    assert choose_nprobe(None, 4000) == 250
    assert choose_nprobe(None, 100) == 16  # at least 16
    assert choose_nprobe(None, 8) == 8  # at most nlist
    assert choose_nprobe(500, 100) == 100


def test_pq_m_must_divide_the_dimension():
    assert choose_pq_m(None, 384) == 48
    assert choose_pq_m(None, 100) == 10  # 100/8 = 12 does not divide 100: the next one down
    assert choose_pq_m(16, 384) == 16
    with pytest.raises(ConfigError, match=r"index.pq_m=7 does not divide .* 384; use one of"):
        choose_pq_m(7, 384)


def test_metric_from_the_merge_norms():
    unit = {"l2_norm": {"min": 0.99995, "max": 1.00003}}
    assert choose_metric("auto", unit, "q.json") == "ip"
    assert choose_metric("auto", {"l2_norm": {"min": 0.2, "max": 7.5}}, "q.json") == "l2"
    assert choose_metric("l2", unit, "q.json") == "l2"
    assert choose_metric("ip", None, "q.json") == "ip"
    with pytest.raises(ConfigError, match=r"reads the L2 norms .* from run/q.json"):
        choose_metric("auto", {}, "run/q.json")


def test_layout_of_each_kind():
    flat = choose_layout(IndexParams(), 5000, 384, "ip")
    assert (flat.kind, flat.nlist, flat.nprobe) == ("flat", 0, 0)
    ivf = choose_layout(IndexParams(kind="ivf_flat"), 10_000, 384, "l2")
    assert (ivf.kind, ivf.metric, ivf.nlist, ivf.train_size, ivf.nprobe) == (
        "ivf_flat",
        "l2",
        400,
        10_000,
        25,
    )
    pq = choose_layout(IndexParams(kind="ivf_pq", pq_nbits=6), 10_000, 384, "ip")
    assert (pq.pq_m, pq.pq_nbits) == (48, 6)
    hnsw = choose_layout(IndexParams(kind="hnsw", hnsw_m=16, ef_search=99), 10, 8, "ip")
    assert (hnsw.hnsw_m, hnsw.ef_search, hnsw.nlist) == (16, 99, 0)
    with pytest.raises(ConfigError, match="no rows: nothing to index"):
        choose_layout(IndexParams(), 0, 384, "ip")
    with pytest.raises(ConfigError, match="pq_nbits=8 needs at least 256 training vectors"):
        choose_layout(IndexParams(kind="ivf_pq", nlist=4), 100, 8, "ip")
