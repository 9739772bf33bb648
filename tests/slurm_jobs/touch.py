"""A trivial task for launcher tests: write this task's completion marker, nothing else.

Kept light (no torch, no Hydra) so thousands of tasks finish quickly on the test cluster.
Usage (as rendered by the launchers): python -m tests.slurm_jobs.touch --run-dir RUN --stage S
"""

import argparse
import os
import sys
from pathlib import Path

from lib.markers import CompletionMarker, write_marker
from lib.task import resolve_task_index

CONFIG_HASH = "touch"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--stage", required=True)
    args = ap.parse_args()
    task = resolve_task_index(os.environ)
    num = int(os.environ.get("EMBEDFLEET_NUM_TASKS", "1"))
    write_marker(
        Path(args.run_dir), args.stage, CompletionMarker(args.stage, task, num, CONFIG_HASH)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
