"""Report stage: one self-contained HTML page of the run's outputs (``lib.report``)."""

from __future__ import annotations

import sys

from lib.report.task import run
from lib.runtime.job import run_stage_task


def main(argv: list[str] | None = None) -> int:
    return run_stage_task("report", run, argv)


if __name__ == "__main__":
    sys.exit(main())
