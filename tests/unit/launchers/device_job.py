"""A tiny job for the local launcher's GPU-binding test: records the device variables it
was started with, then writes its marker (no GPU is touched)."""

import argparse
import os
import sys

from lib.core.markers import CompletionMarker, write_marker
from lib.core.paths import RunPaths
from lib.runtime.environment import current_environment

SEEN = ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--stage", required=True)
    args = ap.parse_args()
    ident = current_environment().identity(args.stage, run_dir=args.run_dir)
    paths = RunPaths(args.run_dir)
    record = {k: os.environ.get(k) for k in SEEN}
    paths.storage.publish_json(f"{args.stage}/out/{ident.task_index}.{ident.rank}.json", record)
    if ident.rank == 0:
        marker = CompletionMarker(args.stage, ident.task_index, ident.num_tasks, "h")
        write_marker(paths.storage, paths.marker(args.stage, ident.task_index), marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
