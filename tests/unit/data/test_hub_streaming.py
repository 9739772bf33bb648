"""dataset.streaming=true on a Hugging Face hub name: its split's data files are resolved
from the local hub cache as ``datasets`` resolves them (the dataset card's ``configs:``),
and parquet files are read by row group: each file's rows from its footer, a range
opens only the files it touches and reads only its row groups. Other files are streamed
with ``datasets``, the skip warned. The cache is built here the way huggingface_hub lays
it out (refs/main, snapshots/<rev>/ linking into blobs/); offline, no network."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib.core.errors import DatasetError
from lib.data.datasets import MultiSource, ParquetSource, StreamSource, open_source
from lib.data.params import DatasetFormat
from tests.unit.data.hub_cache import SIZES, build_hub_cache


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    build_hub_cache(root)
    return root


@pytest.fixture
def hub_env(hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub / "hub"))
    return hub


@pytest.fixture
def spy(monkeypatch):
    """What pyarrow is asked for: the files opened (``opened``) and every row-group read,
    (file name, row groups) in order (``groups``)."""
    seen = {"opened": [], "groups": []}
    names = {}
    real_init, real_read = ParquetSource.__post_init__, pq.ParquetFile.read_row_groups

    def init(self):
        real_init(self)
        names[id(self._file)] = os.path.basename(self.path)
        seen["opened"].append(names[id(self._file)])

    def read_row_groups(self, row_groups, *args, **kwargs):
        seen["groups"].append((names.get(id(self), "?"), list(row_groups)))
        return real_read(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(ParquetSource, "__post_init__", init)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", read_row_groups)
    return seen


def _stream(tmp_path, name="testorg/tiny", **kwargs):
    return open_source(name, DatasetFormat.hf, cache_dir=tmp_path, streaming=True, **kwargs)


def test_a_hub_parquet_dataset_is_read_by_row_group(hub_env, tmp_path, spy, caplog):
    with caplog.at_level(logging.INFO):
        launch = _stream(tmp_path)
    assert isinstance(launch, MultiSource) and launch.num_rows == sum(SIZES)
    names = [f"train-{i:05d}-of-00004.parquet" for i in range(4)]
    assert [os.path.basename(f) for f in launch.files] == names
    assert spy["groups"] == []  # row counts from the footers: no row group read
    assert "read by row group (not streamed)" in caplog.text
    assert "skips" not in caplog.text
    record = launch.record()  # what plan.json keeps
    assert [n for _, n in record["files"]] == SIZES
    # a task: rows [17, 22) are rows 10..11 of file 1 (its 4th row group of 3 rows)
    # and rows 0..2 of file 2 (its 1st)
    spy["opened"].clear()
    task = _stream(tmp_path, files=json.loads(json.dumps(record)))
    got = task.read(17, 22, ["id", "text"])
    assert spy["opened"] == names[1:3]
    assert task.opened == launch.files[1:3]
    assert spy["groups"] == [(names[1], [3]), (names[2], [0])]
    # the same rows as reading every file in full
    full = pa.concat_tables(pq.read_table(f) for f in launch.files)
    assert got.equals(full.slice(17, 5))
    assert got.column("id").to_pylist() == ["r17", "r18", "r19", "r20", "r21"]
    assert task.take(np.array([0, 32]), ["id"]).column(0).to_pylist() == ["r0", "r32"]


def test_a_wider_range_reads_its_row_groups_once(hub_env, tmp_path, spy):
    task = _stream(tmp_path)
    spy["groups"].clear()
    got = task.read(9, 26)  # file 1 rows 2..11, file 2 all, file 3 rows 0..1
    assert got.column("id").to_pylist() == [f"r{i}" for i in range(9, 26)]
    assert [g for _, g in spy["groups"]] == [[0, 1, 2, 3], [0, 1], [0]]


def test_config_and_split_follow_the_dataset_card(hub_env, tmp_path):
    small = _stream(tmp_path, subset="small")
    assert small.num_rows == SIZES[0]
    test = _stream(tmp_path, split="test")
    assert test.read(0, 2).column("id").to_pylist() == ["r1000", "r1001"]
    with pytest.raises(DatasetError, match="has no split 'valid'; available: train, test"):
        _stream(tmp_path, split="valid")


def test_fewer_rows_than_the_card_says_is_refused(hub_env, tmp_path):
    # a partial download: the card's row count of the split is not what its files hold
    with pytest.raises(DatasetError, match=r"hold 12 rows, its dataset card says 13"):
        _stream(tmp_path, subset="partial")


def test_a_jsonl_hub_dataset_streams_with_the_message(hub_env, tmp_path, caplog):
    src = _stream(tmp_path, "testorg/tinyjson", expected_rows=8)
    assert isinstance(src, StreamSource) and src.num_rows == 8
    with caplog.at_level(logging.WARNING):
        got = src.read(5, 7, ["id"])
    assert got.column("id").to_pylist() == ["1-1", "1-2"]
    assert "skips the 5 rows before this task's range" in caplog.text
    assert "not parquet" in caplog.text


def test_a_name_not_in_the_cache_says_so(hub_env, tmp_path):
    with pytest.raises(DatasetError, match="embedfleet never downloads at run time"):
        _stream(tmp_path, "testorg/absent")


def test_the_fingerprint_is_the_blobs(hub_env, tmp_path):
    from lib.config.compose import compose
    from lib.data.fingerprint import dataset_fingerprint

    cfg = compose(
        [
            "dataset.path=testorg/tiny",
            "dataset.format=hf",
            "dataset.streaming=true",
            f"run.root={tmp_path}",
        ]
    )
    fp = dataset_fingerprint(cfg)
    assert len(fp) == 4
    for f, stamp in fp.items():
        assert os.path.basename(os.path.realpath(f)) == stamp["hub_blob"]
        assert stamp["size"] == os.path.getsize(f)
