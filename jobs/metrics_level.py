"""Metrics stage task: the cluster metrics of one k-means level of the run
(``metrics_level{L}``, one rank of a distributed job)."""

from __future__ import annotations

import sys

from lib.metrics.task import run
from lib.runtime.job import run_stage_task


def main(argv: list[str] | None = None) -> int:
    return run_stage_task("metrics", run, argv)


if __name__ == "__main__":
    sys.exit(main())
