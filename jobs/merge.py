"""Merge stage: validate every embed shard, stream them into one matrix, split by source."""

from __future__ import annotations

import sys

from lib.merge.task import run
from lib.runtime.job import run_stage_task


def main(argv: list[str] | None = None) -> int:
    return run_stage_task("merge", run, argv)


if __name__ == "__main__":
    sys.exit(main())
