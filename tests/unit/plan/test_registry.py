"""The explicit table of stages and what the plan builds from it."""

from __future__ import annotations

import pytest

from lib.config.compose import compose
from lib.config.fields import unhashed_keys
from lib.core.errors import ConfigError
from lib.embed.params import EmbedParams
from lib.kmeans.params import KmeansParams
from lib.metrics.params import MetricsParams
from lib.plan.registry import STAGES, build_plan, stage_module
from lib.plan.spec import Plan


def test_every_stage_in_the_table_has_a_builder_and_a_task():
    for name in STAGES:
        assert callable(stage_module(name).build), name
        assert callable(stage_module(name, "task").run), name
        summary = stage_module(name, "summary")
        assert summary is None or callable(summary.summary), name
    known = ", ".join(STAGES)
    assert known.startswith("embed, sync, merge")
    with pytest.raises(ConfigError, match=f"unknown stage 'nope'; known stages: {known}$"):
        stage_module("nope")


def test_the_whole_pipeline_plans_in_order_with_chained_hashes():
    cfg = compose(["+experiment=curation", "stages=[embed,merge,kmeans,curate,metrics]"])
    plan = build_plan(cfg, 5000)
    names = [s.name for s in plan.stages]
    assert names == ["embed", "merge", "kmeans_level1", "kmeans_level2", "curate",
                     "metrics_level1", "metrics_level2"]  # fmt: skip
    deps = {s.name: s.depends_on for s in plan.stages}
    assert deps["kmeans_level2"] == ("kmeans_level1",) and deps["curate"] == ("kmeans_level2",)
    assert deps["metrics_level2"] == ("kmeans_level2",)
    dirs = {s.name: s.stage_dir for s in plan.stages}
    assert dirs["curate"] == "kmeans/curated" and dirs["metrics_level1"] == "metrics/level1"
    assert {s.job for s in plan.group("metrics")} == {"jobs.metrics_level"}
    assert Plan.from_json(plan.to_json()).stages == plan.stages
    # changing level 2 leaves level 1's hash (and the embed stage's) as they were
    cfg.kmeans.n_clusters = [50, 9]
    other = build_plan(cfg, 5000)
    same = {
        s.name
        for s, t in zip(plan.stages, other.stages, strict=True)
        if s.config_hash == t.config_hash
    }
    assert same == {"embed", "merge", "kmeans_level1", "metrics_level1"}


@pytest.mark.parametrize(
    ("section", "cls", "key", "value"),
    [
        ("embed", EmbedParams, "log_every_seconds", 1.0),
        ("kmeans", KmeansParams, "world_size", 2),
        ("kmeans", KmeansParams, "chunk_rows", 1000),
        ("metrics", MetricsParams, "block_rows", 7),
    ],
)
def test_unhashed_settings_keep_every_hash(section, cls, key, value):
    assert key in unhashed_keys(cls)
    cfg = compose(["+experiment=curation", "stages=[embed,merge,kmeans,curate,metrics]"])
    before = [s.config_hash for s in build_plan(cfg, 5000).stages]
    cfg[section][key] = value
    assert [s.config_hash for s in build_plan(cfg, 5000).stages] == before
