"""k-means level stage: one level of the hierarchy, as one rank of a distributed job."""

from __future__ import annotations

import sys

from lib.kmeans.task import run
from lib.runtime.job import run_stage_task


def main(argv: list[str] | None = None) -> int:
    return run_stage_task("kmeans", run, argv)


if __name__ == "__main__":
    sys.exit(main())
