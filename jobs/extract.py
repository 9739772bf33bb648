"""Extract stage: hidden states of chosen layers of a causal LM (``lib.extract``); also
runs ``extract_metadata``, the merge of the tasks' metadata."""

from __future__ import annotations

import sys

from lib.extract.task import run
from lib.runtime.job import run_stage_task


def main(argv: list[str] | None = None) -> int:
    return run_stage_task("extract", run, argv, marks_ready=True)


if __name__ == "__main__":
    sys.exit(main())
