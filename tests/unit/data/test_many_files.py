"""Many-file datasets: a glob (local or fsspec) read as one dataset in sorted file order,
row ranges spanning files, and a task that opens only the files its rows are in."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from lib.config.compose import compose
from lib.core.errors import DatasetError
from lib.data.datasets import MultiSource, open_source
from lib.data.fingerprint import dataset_fingerprint
from lib.data.params import DatasetFormat
from lib.embed.inputs import embed_input

# Mixed sizes, mixed formats; names sort as part-0..part-4.
SIZES = [5, 1, 12, 3, 7]
FORMATS = ["parquet", "jsonl", "csv", "parquet", "jsonl"]


def _write(root, sizes=SIZES, formats=FORMATS) -> list[str]:
    names, row = [], 0
    for i, (n, fmt) in enumerate(zip(sizes, formats, strict=True)):
        rows = [{"id": f"r{row + j}", "text": f"row {row + j}"} for j in range(n)]
        row += n
        path = root / f"part-{i}.{fmt}"
        table = pa.Table.from_pylist(rows)
        if fmt == "parquet":
            pq.write_table(table, path, row_group_size=2)
        elif fmt == "csv":
            pcsv.write_csv(table, path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        names.append(str(path))
    (root / "notes.txt").write_text("not data")
    return names


def test_glob_is_one_dataset_in_sorted_file_order(tmp_path):
    names = _write(tmp_path)
    src = open_source(str(tmp_path / "part-*"), DatasetFormat.auto)
    assert isinstance(src, MultiSource)
    assert src.files == sorted(names) and src.num_rows == sum(SIZES)
    assert src.read(3, 20, ["id"]).column(0).to_pylist() == [f"r{i}" for i in range(3, 20)]
    rows = np.array([0, 5, 6, 17, 18, 27])
    assert src.take(rows, ["id"]).column(0).to_pylist() == [f"r{i}" for i in rows]


def test_a_shard_spanning_two_files_opens_only_those_two(tmp_path):
    names = _write(tmp_path)
    launched = open_source(str(tmp_path / "part-*"), DatasetFormat.auto)
    record = launched.record()  # what plan.json keeps
    assert record["files"] == [[f, n] for f, n in zip(sorted(names), SIZES, strict=True)]
    # A task: rows 15..20 are the last 3 of part-2 (rows 6..17) and 2 of part-3 (18..20).
    task = open_source(str(tmp_path / "part-*"), DatasetFormat.auto, files=record)
    assert task.opened == []
    got = task.read(15, 20, ["id", "text"])
    assert got.column("id").to_pylist() == [f"r{i}" for i in range(15, 20)]
    assert task.opened == [names[2], names[3]]
    task.take(np.array([19, 20]), ["id"])
    assert task.opened == [names[2], names[3]]  # already open: not again


def test_a_file_that_changed_since_launch_is_named(tmp_path):
    _write(tmp_path)
    record = open_source(str(tmp_path / "part-*"), DatasetFormat.auto).record()
    pq.write_table(pa.table({"id": ["x"], "text": ["y"]}), tmp_path / "part-3.parquet")
    task = open_source(str(tmp_path / "part-*"), DatasetFormat.auto, files=record)
    with pytest.raises(DatasetError, match=r"part-3.parquet: has 1 rows, 3 when this run"):
        task.read(15, 20)


def test_glob_errors_name_the_pattern(tmp_path):
    with pytest.raises(DatasetError, match=r"part-\*.parquet matches no parquet"):
        open_source(str(tmp_path / "part-*.parquet"), DatasetFormat.auto)
    _write(tmp_path)
    pq.write_table(pa.table({"other": [1]}), tmp_path / "part-9.parquet")
    with pytest.raises(DatasetError, match=r"part-9.parquet lacks column\(s\) 'id', 'text'"):
        open_source(str(tmp_path / "part-*"), DatasetFormat.auto)


def test_fsspec_glob_launch_records_files_and_fingerprints_each(tmp_path):
    fs = fsspec.filesystem("memory")
    for i, n in enumerate([4, 2, 6]):
        with fs.open(f"/many16/shard-{i}.jsonl", "w") as fh:
            fh.write("".join(json.dumps({"text": f"f{i} row {j}"}) + "\n" for j in range(n)))
    url = "memory://many16/shard-*.jsonl"
    cfg = compose([f"dataset.path={url}", "stages=[embed]", f"run.root={tmp_path}"])
    inp = embed_input(cfg)
    assert inp.rows == 12
    assert [n for _, n in inp.files["files"]] == [4, 2, 6]
    assert sorted(dataset_fingerprint(cfg)) == [f[0] for f in inp.files["files"]]
    task = open_source(url, DatasetFormat.auto, files=inp.files)
    assert task.read(4, 6, ["text"]).column(0).to_pylist() == ["f1 row 0", "f1 row 1"]
    assert task.opened == [inp.files["files"][1][0]]
    assert task.opened[0].endswith("/many16/shard-1.jsonl")


def test_a_list_of_files_and_globs_is_one_sorted_dataset(tmp_path):
    names = _write(tmp_path)
    listed = [names[3], str(tmp_path / "part-[01].*"), names[2]]  # given out of order
    cfg = compose(
        [
            f"dataset.path=[{','.join(repr(x) for x in listed)}]",
            "stages=[embed]",
            f"run.root={tmp_path}",
        ]
    )
    assert cfg.dataset.name == "part-3"
    inp = embed_input(cfg)
    assert [f for f, _ in inp.files["files"]] == names[:4]
    assert inp.rows == sum(SIZES[:4])
    assert sorted(dataset_fingerprint(cfg)) == names[:4]
    src = open_source(cfg.dataset.path, DatasetFormat.auto, files=inp.files)
    assert src.read(4, 7, ["id"]).column(0).to_pylist() == ["r4", "r5", "r6"]
    assert src.opened == names[:3]
    with pytest.raises(DatasetError, match=r"lists .*gone.parquet, which does not exist"):
        open_source([names[0], str(tmp_path / "gone.parquet")], DatasetFormat.auto)
    with pytest.raises(DatasetError, match=r"part-0.parquet more than once"):
        open_source([names[0], str(tmp_path / "part-0.*")], DatasetFormat.auto)
