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


def test_a_directory_is_one_dataset_in_sorted_file_order(tmp_path):
    d = tmp_path / "data"
    (d / "b").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS[:3]), d / "a.parquet", row_group_size=2)
    (d / "b" / "c.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[3:5]))
    pcsv.write_csv(pa.Table.from_pylist(ROWS[5:]), d / "b" / "d.csv")
    (d / "_SUCCESS").write_text("")
    (d / ".cache").mkdir()
    (d / ".cache" / "x.parquet").write_text("not parquet")
    src = open_source(str(d), DatasetFormat.auto)
    _check(src)
    assert src.read(0, 7, ["id"]).column("id").to_pylist() == [r["id"] for r in ROWS]
    assert src.read(6, 7, ["id"]).column("id").to_pylist() == ["r6"]
    only = open_source(str(d), DatasetFormat.parquet)
    assert only.num_rows == 3


def test_a_directory_whose_files_disagree_or_have_no_data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    with pytest.raises(DatasetError, match="has no parquet, jsonl or csv files"):
        open_source(str(d), DatasetFormat.auto)
    pq.write_table(pa.table({"text": ["a"], "id": ["1"]}), d / "1.parquet")
    pq.write_table(pa.table({"body": ["b"]}), d / "2.parquet")
    with pytest.raises(DatasetError, match=r"2.parquet lacks column\(s\) 'text', 'id'"):
        open_source(str(d), DatasetFormat.auto)


def test_jsonl_bytes_that_are_not_utf8(tmp_path):
    from lib.data.params import EncodingErrors

    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"byte offset 28 \(line 2\) is not valid utf-8"):
        open_source(str(p), DatasetFormat.auto)
    rows = open_source(str(p), DatasetFormat.auto, encoding_errors=EncodingErrors.replace)
    assert rows.read(1, 2).column("text").to_pylist() == ["caf\ufffd"]
    latin = open_source(str(p), DatasetFormat.auto, encoding="latin-1")
    assert latin.read(1, 2).column("text").to_pylist() == ["café"]
    with pytest.raises(DatasetError, match="not a codec"):
        open_source(str(p), DatasetFormat.auto, encoding="utf-9")


def test_fingerprint_ignores_a_touch_but_not_a_same_size_edit(tmp_path):
    import os

    from lib.data.fingerprint import file_fingerprint, fingerprint_changes

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["aaaa", "bbbb"]}), p)
    first = file_fingerprint(str(p))
    os.utime(p, (1, 1))
    assert file_fingerprint(str(p)) == first
    pq.write_table(pa.table({"text": ["aaaa", "cccc"]}), p)
    second = file_fingerprint(str(p))
    assert second["size"] == first["size"] and second != first
    assert fingerprint_changes({str(p): first}, {str(p): second}) == [
        f"{p}: changed since this run embedded it (same size, different content)"
    ]
    with fsspec.open("memory://fp/d.parquet", "wb") as fh:
        fh.write(b"abc")
    assert file_fingerprint("memory://fp/d.parquet")["size"] == 3


def test_the_cache_of_derived_datasets_is_the_run_root_unless_the_environment_names_one(
    tmp_path, monkeypatch
):
    from omegaconf import OmegaConf

    from lib.data.columns import ENV_CACHE_DIR, cache_dir

    cfg = OmegaConf.create({"run": {"root": str(tmp_path / "runs")}})
    monkeypatch.delenv(ENV_CACHE_DIR, raising=False)
    assert cache_dir(cfg) == tmp_path / "runs" / ".cache"
    cfg.run.root = "s3://bucket/runs"
    assert cache_dir(cfg).name == "datasets" and "bucket" not in str(cache_dir(cfg))
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "shared"))
    assert cache_dir(cfg) == tmp_path / "shared"
