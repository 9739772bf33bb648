"""dataset.streaming=true (format=hf): a dataset read with datasets' streaming mode, never
materialised; a task's range skips the rows before it (warned), the row count comes from
dataset.expected_rows, and a directory of parquet files is read by row group instead."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib.core.errors import DatasetError
from lib.data.datasets import MultiSource, StreamSource, open_source
from lib.data.params import DatasetFormat


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    for f in range(3):
        rows = [{"id": f"{f}-{i}", "text": f"file {f} row {i}"} for i in range(5)]
        (root / f"part{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_a_streamed_range_is_the_right_rows_and_the_skip_is_warned(jsonl_dir, caplog):
    src = open_source(str(jsonl_dir), DatasetFormat.hf, streaming=True, expected_rows=15)
    assert isinstance(src, StreamSource) and src.num_rows == 15
    assert set(src.columns) == {"id", "text"}
    with caplog.at_level(logging.WARNING):
        got = src.read(6, 9, ["id"])
    assert got.column("id").to_pylist() == ["1-1", "1-2", "1-3"]
    assert any("skips the 6 rows before" in r.getMessage() for r in caplog.records)
    assert src.take(np.array([0, 14]), ["text"]).column(0).to_pylist() == [
        "file 0 row 0",
        "file 2 row 4",
    ]
    with pytest.raises(DatasetError, match="the stream ended after 15 rows"):
        src.read(10, 16)


def test_streaming_without_a_row_count_asks_for_expected_rows(jsonl_dir):
    with pytest.raises(DatasetError, match="set dataset.expected_rows"):
        open_source(str(jsonl_dir), DatasetFormat.hf, streaming=True)


def test_a_parquet_directory_is_read_by_row_group_not_streamed(tmp_path):
    for f in range(2):
        table = pa.table({"text": [f"f{f} r{i}" for i in range(6)]})
        pq.write_table(table, tmp_path / f"p{f}.parquet", row_group_size=2)
    src = open_source(str(tmp_path), DatasetFormat.hf, streaming=True)
    assert isinstance(src, MultiSource) and src.num_rows == 12
    assert src.read(7, 9).column("text").to_pylist() == ["f1 r1", "f1 r2"]


def test_the_launch_plans_a_streamed_dataset_from_expected_rows(jsonl_dir, tmp_path):
    from lib.config.compose import compose
    from lib.embed.inputs import embed_input

    cfg = compose(
        [
            f"dataset.path={jsonl_dir}",
            "dataset.format=hf",
            "dataset.streaming=true",
            "dataset.expected_rows=15",
            "dataset.limit=12",
            "stages=[embed]",
            f"run.root={tmp_path}",
        ]
    )
    assert embed_input(cfg).rows == 12
