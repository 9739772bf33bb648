"""The report stage in a plan: after whatever stages the run has, hash chained to theirs,
report.* unhashed."""

from __future__ import annotations

from lib.config.compose import compose
from lib.plan.registry import build_plan


def _report(stages: str, *extra: str):
    plan = build_plan(compose(["+experiment=curation", f"stages={stages}", *extra]), 1000)
    return plan, plan.stages[-1]


def test_report_runs_after_every_other_planned_stage():
    plan, report = _report("[embed,merge,kmeans,curate,metrics,index,report]")
    assert report.name == "report" and report.num_tasks == 1 and report.job == "jobs.report"
    assert report.stage_dir == "report"
    assert report.depends_on == tuple(s.name for s in plan.stages[:-1])
    _, only = _report("[report]")
    assert only.depends_on == ()
    _, some = _report("[embed,merge,report]")
    assert some.depends_on == ("embed", "merge")


def test_report_hash_follows_upstream_and_ignores_report_settings():
    _, base = _report("[embed,merge,report]")
    _, shown = _report("[embed,merge,report]", "report.max_points=10", "report.umap=true")
    assert shown.config_hash == base.config_hash
    _, other = _report("[embed,merge,report]", "model.max_length=64")
    assert other.config_hash != base.config_hash
