"""Pilot sampling (lib.data.sampling): counts per source, first = dataset order, a seeded
random draw that repeats and changes with the seed, sources filter, row reads by index."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib.config.compose import compose
from lib.core.errors import ConfigError, DatasetError
from lib.data.datasets import open_source
from lib.data.params import DatasetFormat, Sampling
from lib.data.sampling import select_rows
from lib.embed.inputs import embed_input

# 3 sources of unequal size, interleaved unevenly: a (20 rows), b (12), c (3).
SOURCES = ["a", "b"] * 12 + ["c", "a", "c", "a", "c"] + ["a"] * 6


def _rows_of(name: str) -> list[int]:
    return [i for i, s in enumerate(SOURCES) if s == name]


def test_exact_counts_per_source_and_small_sources_whole():
    for how in Sampling:
        sample = select_rows(SOURCES, 4, how, 0, [])
        got = {s: sample.sources.count(s) for s in set(sample.sources)}
        assert got == {"a": 4, "b": 4, "c": 3}, how
        assert list(sample.row_index) == sorted(sample.row_index)
        assert [SOURCES[i] for i in sample.row_index] == sample.sources


def test_first_is_each_sources_first_rows_in_dataset_order():
    sample = select_rows(SOURCES, 4, Sampling.first, 0, [])
    expected = sorted(_rows_of("a")[:4] + _rows_of("b")[:4] + _rows_of("c"))
    assert sample.row_index.tolist() == expected


def test_random_repeats_with_its_seed_and_differs_with_another():
    one = select_rows(SOURCES, 5, Sampling.random, 42, [])
    again = select_rows(SOURCES, 5, Sampling.random, 42, [])
    other = select_rows(SOURCES, 5, Sampling.random, 43, [])
    assert one.row_index.tolist() == again.row_index.tolist()
    assert one.row_index.tolist() != other.row_index.tolist()
    assert one.summary() == again.summary() and one.summary() != other.summary()
    # without replacement, within its source, not simply the first rows
    a_rows = [int(i) for i in one.row_index if SOURCES[i] == "a"]
    assert len(set(a_rows)) == 5 and set(a_rows) <= set(_rows_of("a"))
    assert a_rows != _rows_of("a")[:5]
    # one source's draw does not depend on the other sources being kept
    only_a = select_rows(SOURCES, 5, Sampling.random, 42, ["a"])
    assert only_a.row_index.tolist() == a_rows


def test_sources_filter_and_unknown_source_named():
    sample = select_rows(SOURCES, None, Sampling.first, 0, ["c", "b"])
    assert sample.row_index.tolist() == sorted(_rows_of("b") + _rows_of("c"))
    with pytest.raises(DatasetError, match=r"'nope'.*its sources: a, b, c"):
        select_rows(SOURCES, None, Sampling.first, 0, ["b", "nope"])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sampling") / "d.parquet"
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(len(SOURCES))],
            "source": SOURCES,
            "text": [f"row {i}" for i in range(len(SOURCES))],
        }
    )
    pq.write_table(table, path, row_group_size=4)
    return str(path)


def _cfg(dataset: str, *over: str):
    return compose([f"dataset.path={dataset}", "stages=[embed]", *over])


def test_launch_input_is_the_sample_and_limit_applies_first(dataset):
    inp = embed_input(_cfg(dataset, "dataset.per_source=2"))
    assert inp.rows == 6 and inp.sample is not None
    assert inp.sample.row_index.tolist() == sorted(
        _rows_of("a")[:2] + _rows_of("b")[:2] + _rows_of("c")[:2]
    )
    # the draw is over the first 25 rows only: a and b 2 each, c's one row there
    limited = embed_input(_cfg(dataset, "dataset.per_source=2", "dataset.limit=25"))
    assert limited.sample.row_index.tolist() == [0, 1, 2, 3, 24]
    assert embed_input(_cfg(dataset)).sample is None


def test_take_reads_the_rows_at_their_indices(dataset):
    src = open_source(dataset, DatasetFormat.auto)
    rows = np.array([1, 2, 9, 30, 34])
    got = src.take(rows, ["id", "text"])
    assert got.column("id").to_pylist() == [f"r{i}" for i in rows]


def test_append_with_a_sample_refused(dataset):
    with pytest.raises(ConfigError, match="embed.append=true cannot be combined"):
        embed_input(_cfg(dataset, "dataset.per_source=2", "embed.append=true"))


def test_pilot_1k_is_full_v2_sampled():
    pilot = compose(["+experiment=pilot_1k"])
    full = compose(["+experiment=full_v2"])
    assert pilot.run.name != full.run.name
    assert (pilot.dataset.per_source, pilot.dataset.sampling, pilot.dataset.seed) == (
        1000,
        "random",
        42,
    )
    for key in ("path", "text_mode", "chat"):
        assert pilot.dataset[key] == full.dataset[key]
    assert pilot.model == full.model
