"""Bad data end to end through launch.py (issue 19): bytes that are not UTF-8, empty texts
and shards whose rows are all dropped, a max_length the model cannot take, a directory
as a dataset (nothing written outside the run dir), duplicate ids, and a dataset changed
in place under the same path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib.formats.arrays import open_embeddings, read_safetensors_header
from tests.conftest import run_launch

pytestmark = pytest.mark.slow

BASE = ["+experiment=quickstart", "embed.num_shards=2"]
# Where a test needs no second shard: every task process costs ~10 CPU s of start-up.
ONE = ["+experiment=quickstart", "embed.num_shards=1"]


def _ok(proc):
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _failed(proc) -> str:
    assert proc.returncode != 0, f"expected a failure:\n{proc.stdout[-2000:]}"
    return proc.stdout + proc.stderr


def _embedding(st_model, text: str) -> np.ndarray:
    return st_model.encode([text], normalize_embeddings=False)[0]


# ------------------------------------------------------------------ bytes that are not UTF-8


def test_non_utf8_csv_is_an_error_then_decoded_with_dataset_encoding(tmp_path, st_model):
    path = tmp_path / "latin.csv"
    path.write_bytes(
        b"id,text\na,caf\xe9 au lait with cream\nb,the weather is nice today\n"
        b"c,a third row of plain text\nd,and a fourth one\n"
    )
    args = [*ONE, f"dataset.path={path}", f"run.root={tmp_path / 'out'}"]
    out = _failed(run_launch(*args))
    assert f"{path}: row 0, column 'text': byte offset 3" in out
    assert "dataset.encoding" in out and "dataset.encoding_errors=replace" in out

    _ok(run_launch(*args, "run.name=latin", "dataset.encoding=latin-1"))
    run = tmp_path / "out" / "latin"
    emb = np.asarray(open_embeddings(run / "merge" / "embeddings.safetensors"))
    # Row 0 is the decoded text, not "b'caf\\xe9 ...'".
    want = _embedding(st_model, "café au lait with cream")
    assert np.allclose(emb[0], want, atol=1e-4)


def test_non_utf8_jsonl_is_refused_at_launch_naming_offset_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine row"}\n{"text": "caf\xe9"}\n')
    proc = run_launch(*BASE, f"dataset.path={path}", f"run.root={tmp_path / 'out'}")
    out = _failed(proc)
    assert f"{path}: byte offset 34 (line 2) is not valid utf-8" in out
    assert not list((tmp_path / "out").glob("*/plan.json"))


def test_a_text_column_of_ints_is_refused_at_launch_unless_cast_text(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [3, 1, 4, 1]}), path)
    out = _failed(run_launch(*BASE, f"dataset.path={path}", f"run.root={tmp_path}"))
    assert f"{path}: text column 'text' has type int64, not text (row 0: 3)" in out
    assert "dataset.cast_text=true" in out
    assert not list(tmp_path.glob("*/plan.json"))


# ------------------------------------------------- empty texts, all-dropped shards, duplicates


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory) -> Path:
    """8 rows in 2 shards of 2 parts each: shard 1 has no usable row at all (empty,
    whitespace-only, null), and id "dup" appears twice."""
    root = tmp_path_factory.mktemp("messy")
    texts = [
        "the first sentence is about parsing",
        "   ",
        "the third sentence is about cooking",
        "the fourth sentence is about rivers",
        "",
        "\t\n ",
        None,
        "",
    ]
    ids = ["a", "b", "dup", "dup", "e", "f", "g", "h"]
    pq.write_table(pa.table({"id": ids, "text": texts}), root / "messy.parquet")
    _ok(
        run_launch(
            *BASE,
            f"dataset.path={root / 'messy.parquet'}",
            "dataset.on_null_text=drop",
            "embed.part_rows=2",
            f"run.root={root}",
            "run.name=messy",
        )
    )
    return root / "messy"


def test_empty_texts_are_dropped_with_reason_empty(messy_run):
    dropped = pq.read_table(messy_run / "merge" / "dropped_rows.parquet").to_pylist()
    assert [(d["row_index"], d["reason"]) for d in dropped] == [
        (1, "empty"),
        (4, "empty"),
        (5, "empty"),
        (6, "null_text"),
        (7, "empty"),
    ]
    meta = pq.read_table(messy_run / "merge" / "metadata.parquet")
    assert meta.column("row_index").to_pylist() == [0, 2, 3]


def test_a_shard_with_every_row_dropped_is_a_valid_empty_shard(messy_run):
    marker = json.loads((messy_run / "embed" / "completions" / "task_00001.json").read_text())
    assert marker["counts"]["embedded"] == 0 and marker["row_range"] == [4, 8]
    shard = messy_run / "embed" / "shards" / "shard_00001.safetensors"
    with open(shard, "rb") as fh:
        header, _ = read_safetensors_header(fh, shard.stat().st_size, str(shard))
    assert header["embeddings"]["shape"] == [0, 384]
    report = json.loads((messy_run / "merge" / "quality_report.json").read_text())
    assert report["shape"] == [3, 384]
    assert [s["rows"] for s in report["shards"]] == [3, 0]


def test_duplicate_ids_are_counted_and_can_be_refused(messy_run, tmp_path):
    report = json.loads((messy_run / "merge" / "quality_report.json").read_text())
    assert report["duplicate_ids"] == 1
    assert report["duplicate_id_examples"] == {"dup": [2, 3]}
    proc = run_launch(
        *BASE,
        f"dataset.path={messy_run.parent / 'messy.parquet'}",
        "dataset.unique_ids=true",
        f"run.root={tmp_path}",
    )
    out = _failed(proc)
    assert "1 row(s) repeat an earlier id in column 'id'; the first: id 'dup' at rows 2, 3" in out
    assert not list(tmp_path.glob("*/plan.json"))


# ------------------------------------------------------------------ model limits


def test_max_length_above_the_models_positions_is_refused_at_launch(tmp_path):
    proc = run_launch(*BASE, "model.max_length=100000", f"run.root={tmp_path}")
    out = _failed(proc)
    assert "model.max_length=100000 is more than model all-MiniLM-L6-v2 can take" in out
    assert "at most 512 tokens" in out
    assert not list(tmp_path.glob("*/plan.json"))


# ------------------------------------------------------------------ a directory as a dataset


def test_a_directory_of_files_is_one_dataset_and_nothing_is_written_outside(tmp_path):
    data = tmp_path / "corpus"
    (data / "part2").mkdir(parents=True)
    pq.write_table(
        pa.table(
            {"id": ["p0", "p1", "p2"], "text": [f"parquet row {i} of text" for i in range(3)]}
        ),
        data / "part1.parquet",
    )
    (data / "part2" / "more.jsonl").write_text(
        "\n".join(json.dumps({"id": f"j{i}", "text": f"json row {i} of text"}) for i in range(2))
    )
    (data / "_SUCCESS").write_text("")
    (data / ".hidden.csv").write_text("id,text\nx,never read\n")
    before = sorted(data.rglob("*"))
    home, hf_home = tmp_path / "home", tmp_path / "hf_home"
    home.mkdir()
    hf_home.mkdir()
    env = {"HOME": str(home), "HF_HOME": str(hf_home), "XDG_CACHE_HOME": str(home / ".cache")}
    _ok(run_launch(*BASE, f"dataset.path={data}", f"run.root={tmp_path / 'out'}", env=env))
    run = tmp_path / "out" / "quickstart-corpus"
    meta = pq.read_table(run / "merge" / "metadata.parquet")
    assert meta.column("id").to_pylist() == ["p0", "p1", "p2", "j0", "j1"]
    assert meta.column("row_index").to_pylist() == list(range(5))
    assert not any(hf_home.rglob("*")), list(hf_home.rglob("*"))
    assert not any(home.rglob("*")), list(home.rglob("*"))
    assert sorted(data.rglob("*")) == before  # no cache beside the data either


# ------------------------------------------------------------------ a dataset changed in place


def test_a_dataset_changed_in_place_is_an_error_until_force_replan(tmp_path, st_model):
    path = tmp_path / "d.parquet"
    texts = [f"sentence number {i} about the sea" for i in range(6)]

    def write(rows: list[str]) -> None:
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(6)], "text": rows}), path)

    write(texts)
    args = [*ONE, f"dataset.path={path}", f"run.root={tmp_path / 'out'}", "run.name=inplace"]
    _ok(run_launch(*args))
    run = tmp_path / "out" / "inplace"
    markers = sorted(run.glob("embed/completions/task_*.json"))
    before = {m: m.read_bytes() for m in markers}

    # A touch (same bytes, new mtime) is not a change: nothing is redone.
    os.utime(path, (1_000_000_000, 1_000_000_000))
    again = _ok(run_launch(*args))
    assert "embed: all 1 task(s) already complete" in again.stdout
    assert {m: m.read_bytes() for m in markers} == before

    texts[4] = "a completely different sentence about mountains"
    write(texts)  # same path, same row count, other content
    out = _failed(run_launch(*args))
    assert f"{path}: changed since this run embedded it" in out
    assert "run.name=" in out and "--force-replan" in out

    _ok(run_launch(*args, "--force-replan"))
    emb = np.asarray(open_embeddings(run / "merge" / "embeddings.safetensors"))
    assert np.allclose(emb[4], _embedding(st_model, texts[4]), atol=1e-4)
    assert list((run / "embed" / "completions" / "invalid").glob("task_*.json"))


def test_a_run_whose_every_row_is_dropped_is_refused_by_merge(tmp_path):
    path = tmp_path / "long.parquet"
    pq.write_table(pa.table({"text": ["a sentence of more than four tokens"] * 3}), path)
    proc = run_launch(
        "+experiment=quickstart",
        "embed.num_shards=1",
        "model.max_length=4",
        f"dataset.path={path}",
        f"run.root={tmp_path}",
    )
    out = _failed(proc)
    assert "every row of the 1 shard(s) was dropped, so there is nothing to merge" in out
    assert "raise model.max_length" in out
    run = tmp_path / "quickstart-long"
    assert (run / "embed" / "completions" / "task_00000.json").exists()  # a valid empty shard
    assert not (run / "merge" / "embeddings.safetensors").exists()
