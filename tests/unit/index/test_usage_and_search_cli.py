"""Per-task usage in markers and in ``status``; the query prompt; search's build command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from cli.search import build_command, first_line
from cli.status import StageStatus, human_bytes
from lib.core.markers import CompletionMarker, parse_marker, read_marker, write_marker
from lib.core.paths import RunPaths
from lib.core.usage import current_usage
from lib.embed.query import model_query_prompt, query_prompt
from lib.plan.spec import SINGLE, Plan, StageSpec


def test_every_marker_records_peak_rss_and_cpu_seconds(tmp_path):
    paths = RunPaths(tmp_path)
    grown = np.ones(40 * 2**20 // 8)  # ~40 MiB touched: the peak is at least that
    write_marker(paths.storage, "s/completions/task_00000.json", CompletionMarker("s", 0, 1, "h"))
    marker = read_marker(paths.storage, "s/completions/task_00000.json")
    assert marker.peak_rss_bytes >= grown.nbytes
    assert marker.peak_rss_children_bytes >= 0 and marker.cpu_seconds > 0
    assert marker.peak_cuda_bytes is None  # CUDA never initialized here
    assert current_usage().peak_rss_bytes >= marker.peak_rss_bytes


def test_markers_written_before_the_usage_fields_still_parse():
    old = {"stage": "embed", "task": 2, "num_tasks": 4, "config_hash": "h", "outputs": []}
    marker = parse_marker(json.dumps(old).encode(), "old.json")
    assert marker.task == 2 and marker.peak_rss_bytes is None and marker.cpu_seconds is None


def test_status_figures_per_stage():
    st = StageStatus(StageSpec("embed", "embed", "jobs.embed", "embed", SINGLE, 2, "h"))
    st.add_usage({"peak_rss_bytes": 100, "peak_rss_children_bytes": 3 * 2**30, "cpu_seconds": 2.5})
    st.add_usage({"peak_rss_bytes": 2**30, "peak_cuda_bytes": 5 * 2**20, "cpu_seconds": 1.0})
    st.add_usage({"stage": "embed"})  # an old marker: nothing to add
    assert st.peak_rss_bytes == 3 * 2**30 and st.peak_cuda_bytes == 5 * 2**20
    assert st.cpu_seconds == pytest.approx(3.5)
    shown = [human_bytes(n) for n in (None, 512, 3 * 2**30, 150 * 2**20)]
    assert shown == ["-", "512B", "3.0G", "150M"]


def test_query_prompt_precedence(tmp_path):
    (tmp_path / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "Instruct: find\nQuery:", "document": ""}})
    )
    model = OmegaConf.create({"query_prompt": None, "document_prefix": "passage: "})
    assert model_query_prompt(tmp_path) == "Instruct: find\nQuery:"
    assert query_prompt(model, tmp_path) == "Instruct: find\nQuery:"  # the model's own
    assert query_prompt(model, tmp_path / "none") == "passage: "  # else as documents
    model.query_prompt = "q: "
    assert query_prompt(model, tmp_path) == "q: "
    model.query_prompt = ""
    assert query_prompt(model, tmp_path) == ""  # explicitly none


def test_the_build_command_keeps_the_launch_overrides_and_adds_index():
    cfg = OmegaConf.create({"run": {"root": "/abs/runs", "name": "my run"}})
    embed = StageSpec("embed", "embed", "jobs.embed", "embed", SINGLE, 1, "h")
    merge = StageSpec("merge", "merge", "jobs.merge", "merge", SINGLE, 1, "m")
    plan = Plan([embed, merge], 10)
    plan.extra["overrides"] = ["+experiment=quickstart", "run.root=rel", "stages=[embed,merge]"]
    assert build_command(cfg, plan) == (
        "python launch.py +experiment=quickstart run.root=/abs/runs 'run.name=my run' "
        "'stages=[embed,merge,index]'"
    )
    del plan.extra["overrides"]  # a run launched before plan.json kept them
    assert build_command(cfg, plan).startswith(
        "python launch.py <the overrides this run was launched with> run.root=/abs/runs"
    )
    assert first_line("\n\n  First line.  \nsecond") == "First line."
    assert len(first_line("x" * 500)) == 100
