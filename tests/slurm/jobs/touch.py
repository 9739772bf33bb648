"""A trivial task for launcher tests: write this task's completion marker, nothing else.

Kept light (no torch, no Hydra) so thousands of tasks finish quickly on the test cluster.
Usage (as rendered by the launchers): python -m tests.slurm.jobs.touch --run-dir RUN --stage S
"""

import sys

from lib.core.markers import CompletionMarker, write_marker
from tests.job_start import job_start

CONFIG_HASH = "touch"


def main() -> int:
    args, identity, paths = job_start()
    marker = CompletionMarker(args.stage, identity.task_index, identity.num_tasks, CONFIG_HASH)
    write_marker(paths.storage, paths.marker(args.stage, identity.task_index), marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
