"""A trivial task for launcher tests: write this task's completion marker, nothing else.

Kept light (no torch, no Hydra) so thousands of tasks finish quickly on the test cluster.
Usage (as rendered by the launchers): python -m tests.slurm.jobs.touch --run-dir RUN --stage S
"""

import argparse
import sys

from lib.core.markers import CompletionMarker, write_marker
from lib.core.paths import RunPaths
from lib.runtime.environment import current_environment

CONFIG_HASH = "touch"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--stage", required=True)
    args = ap.parse_args()
    identity = current_environment().identity(args.stage, run_dir=args.run_dir)
    paths = RunPaths(args.run_dir)
    marker = CompletionMarker(args.stage, identity.task_index, identity.num_tasks, CONFIG_HASH)
    write_marker(paths.storage, paths.marker(args.stage, identity.task_index), marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
