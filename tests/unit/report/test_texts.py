"""The report's texts come from the merge's metadata when the run kept them there
(``dataset.keep_text``), so a dataset moved or changed since does not matter."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lib.config.compose import compose
from lib.core.paths import RunPaths
from lib.report.collect import TextReader, merged_rows


def _run(tmp_path, columns: dict) -> RunPaths:
    paths = RunPaths(tmp_path / "run")
    meta = tmp_path / "run" / paths.merge_metadata
    meta.parent.mkdir(parents=True)
    table = pa.table({"row_index": [0, 2, 5, 9], "id": ["a", "c", "f", "j"],
                      "source": ["s1", "s1", "s2", "s2"], **columns})  # fmt: skip
    pq.write_table(table, meta, row_group_size=2)  # rows in two row groups
    return paths


def _cfg(tmp_path):
    cfg = compose(["+experiment=quickstart"])
    cfg.dataset.path = str(tmp_path / "gone.parquet")  # nothing to rebuild texts from
    return cfg


def test_texts_of_dataset_rows_are_read_from_the_metadata(tmp_path):
    paths = _run(tmp_path, {"text": ["zero", "two", "five", "nine"]})
    reader = TextReader(_cfg(tmp_path), paths, merged_rows(paths))
    got = reader.texts(np.array([9, 0, 5, 3]))  # 3 was dropped: not in the merge
    assert got == {0: "zero", 5: "five", 9: "nine"} and reader.problem is None


def test_a_chat_runs_prompt_and_response_are_shown(tmp_path):
    paths = _run(tmp_path, {"user_prompt": ["q0", "q2", "q5", "q9"],
                            "think_text": ["", "", "t5", ""],
                            "response_text": ["r0", None, "r5", "r9"]})  # fmt: skip
    got = TextReader(_cfg(tmp_path), paths, merged_rows(paths)).texts(np.array([2, 5]))
    assert got == {2: "q2", 5: "q5\n\nr5"}


def test_without_kept_text_the_dataset_is_read_and_its_absence_said(tmp_path):
    paths = _run(tmp_path, {})
    reader = TextReader(_cfg(tmp_path), paths, merged_rows(paths))
    assert reader.texts(np.array([0, 2])) == {} and "could not be read back" in reader.problem
