"""Curate stage: a balanced subset sampled from the finished k-means hierarchy."""

from __future__ import annotations

import sys

from lib.curate.task import run
from lib.runtime.job import run_stage_task


def main(argv: list[str] | None = None) -> int:
    return run_stage_task("curate", run, argv)


if __name__ == "__main__":
    sys.exit(main())
