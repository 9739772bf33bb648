import json

import fsspec
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from lib.core.errors import DatasetError
from lib.data.datasets import open_source
from lib.data.params import DatasetFormat

ROWS = [{"id": f"r{i}", "body": f"text number {i}", "src": "a" if i < 3 else "b"} for i in range(7)]


def _check(src):
    assert src.num_rows == 7
    assert set(src.columns) >= {"id", "body", "src"}
    t = src.read(2, 5, ["id", "body"])
    assert t.column("id").to_pylist() == ["r2", "r3", "r4"]


def test_parquet_reads_only_overlapping_row_groups(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p, row_group_size=2)
    src = open_source(str(p), DatasetFormat.auto)
    _check(src)
    assert src.read(6, 7).column("id").to_pylist() == ["r6"]


def test_jsonl_and_csv(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    _check(open_source(str(j), DatasetFormat.auto))
    c = tmp_path / "d.csv"
    pcsv.write_csv(pa.Table.from_pylist(ROWS), c)
    _check(open_source(str(c), DatasetFormat.auto))


def test_fsspec_url():
    with fsspec.open("memory://bucket/d.parquet", "wb") as fh:
        pq.write_table(pa.Table.from_pylist(ROWS), fh)
    _check(open_source("memory://bucket/d.parquet", DatasetFormat.auto))


def test_hugging_face_datasets_from_local_files(tmp_path):
    import datasets

    d = tmp_path / "hfds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(d))
    _check(open_source(str(d), DatasetFormat.hf))
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS), raw / "train.parquet")
    _check(open_source(str(raw), DatasetFormat.hf, split="train"))


def test_missing_path_and_unknown_hf_name(tmp_path):
    with pytest.raises(DatasetError, match="does not exist; set dataset.path"):
        open_source(str(tmp_path / "nope.parquet"), DatasetFormat.auto)
    with pytest.raises(DatasetError, match="never downloads"):
        open_source("no-such-org/no-such-dataset", DatasetFormat.hf)
    with pytest.raises(DatasetError, match="unknown builtin"):
        open_source("builtin:nope", DatasetFormat.auto)


def test_corpus_is_real_and_large_enough(corpus_table):
    assert corpus_table.num_rows >= 5000
    sources = set(corpus_table.column("source").to_pylist())
    assert {"email", "asyncio", "json"} <= sources
    ids = corpus_table.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
