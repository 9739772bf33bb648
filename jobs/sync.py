"""Sync stage: pull one remote source's files over SFTP, verified and resumable."""

from __future__ import annotations

import sys

from lib.runtime.job import run_stage_task
from lib.sync.task import run


def main(argv: list[str] | None = None) -> int:
    return run_stage_task("sync", run, argv)


if __name__ == "__main__":
    sys.exit(main())
