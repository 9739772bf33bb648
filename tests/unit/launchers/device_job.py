"""A tiny job for the local launcher's GPU-binding test: records the device variables it
was started with, then writes its marker (no GPU is touched)."""

import os
import sys

from lib.core.markers import CompletionMarker, write_marker
from tests.job_start import job_start

SEEN = ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def main() -> int:
    args, ident, paths = job_start()
    record = {k: os.environ.get(k) for k in SEEN}
    paths.storage.publish_json(f"{args.stage}/out/{ident.task_index}.{ident.rank}.json", record)
    if ident.rank == 0:
        marker = CompletionMarker(args.stage, ident.task_index, ident.num_tasks, "h")
        write_marker(paths.storage, paths.marker(args.stage, ident.task_index), marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
