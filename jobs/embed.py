"""Embed stage task: one contiguous row range of the dataset -> one shard."""

from __future__ import annotations

import sys

from lib.embed.task import run
from lib.runtime.job import run_stage_task


def main(argv: list[str] | None = None) -> int:
    return run_stage_task("embed", run, argv, marks_ready=True)


if __name__ == "__main__":
    sys.exit(main())
