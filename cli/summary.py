"""The end-of-run summary: where every stage put its outputs (each stage's ``summary``)."""

from __future__ import annotations

from lib.core.paths import RunPaths
from lib.plan.registry import summary_lines
from lib.plan.spec import Plan


def print_summary(paths: RunPaths, plan: Plan, seconds: float) -> None:
    print(f"\ncomplete in {seconds:.1f}s: {paths.root}")
    for line in summary_lines(paths, plan):
        print(line)
    print(f"  status         python launch.py status {paths.root}")
