"""The GPU smoke suite's scripts import and their CPU pieces work here (the whole suite:
``bash bench/gpu/run.sh --smoke``); the GPU numbers need a GPU (``bench/gpu/run.sh``)."""

from __future__ import annotations

import importlib
import json

import pytest

from bench.gpu.embed import input_order_batches, token_ids
from bench.gpu.report import main as report

MODULES = ["common", "models", "embed", "vllm_embed", "kmeans", "report"]


@pytest.mark.parametrize("name", MODULES)
def test_every_script_imports(name):
    module = importlib.import_module(f"bench.gpu.{name}")
    assert module.__doc__


def test_the_unsorted_baseline_keeps_the_budget_and_the_input_order():
    ids = token_ids(200)
    lengths = [len(x) for x in ids]
    batches = input_order_batches(lengths, 32, 4096)
    assert [i for b in batches for i in b] == list(range(200))
    assert all(len(b) <= 32 and len(b) * max(lengths[i] for i in b) <= 4096 for b in batches)
    assert min(lengths) >= 16 and max(lengths) <= 512


def test_the_report_prints_one_table_and_writes_the_summary(tmp_path, capsys):
    rows = [{"bench": "kmeans", "what": "ours", "value": 1.5, "unit": "TFLOP/s", "note": ""}]
    (tmp_path / "kmeans.json").write_text(json.dumps({"meta": {"gpu": "X"}, "rows": rows}))
    skipped = [{"bench": "vllm", "what": "v", "value": None, "unit": "", "note": "not installed"}]
    (tmp_path / "vllm.json").write_text(json.dumps({"meta": {"gpu": "X"}, "rows": skipped}))
    assert report([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| kmeans | ours | 1.5 | TFLOP/s |" in out and "| vllm | v | – |" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["gpu"] == ["X"] and set(summary["parts"]) == {"kmeans", "vllm"}
