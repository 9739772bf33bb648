"""Index stage: a faiss index of the merged embeddings and its id map (``lib.index``)."""

from __future__ import annotations

import sys

from lib.index.task import run
from lib.runtime.job import run_stage_task


def main(argv: list[str] | None = None) -> int:
    return run_stage_task("index", run, argv)


if __name__ == "__main__":
    sys.exit(main())
