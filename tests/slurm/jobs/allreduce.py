"""A distributed smoke task: every rank joins torch.distributed (gloo) from the SLURM
environment, all-reduces its rank, and rank 0 writes the sum and world size."""

import argparse
import sys

import torch

from lib.compute import distributed as dist
from lib.core.markers import CompletionMarker, write_marker
from lib.core.paths import RunPaths


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--stage", required=True)
    args = ap.parse_args()
    paths = RunPaths(args.run_dir)
    with dist.process_group() as env:
        t = torch.tensor([float(env.rank)])
        dist.all_reduce_sum_(t)
        if env.rank == 0:
            result = {"sum": t.item(), "world": dist.world_size()}
            paths.storage.publish_json(f"{args.stage}/result.json", result)
            marker = CompletionMarker(args.stage, 0, 1, "touch")
            write_marker(paths.storage, paths.marker(args.stage, 0), marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
