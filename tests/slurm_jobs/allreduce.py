"""A distributed smoke task: every rank joins torch.distributed (gloo) from the SLURM
environment, all-reduces its rank, and rank 0 writes the sum and world size."""

import argparse
import json
import sys
from pathlib import Path

import torch

from lib import distributed as dist
from lib.markers import CompletionMarker, write_marker


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--stage", required=True)
    args = ap.parse_args()
    with dist.process_group() as env:
        t = torch.tensor([float(env.rank)])
        dist.all_reduce_sum_(t)
        if env.rank == 0:
            out = Path(args.run_dir) / args.stage / "result.json"
            out.write_text(json.dumps({"sum": t.item(), "world": dist.world_size()}))
            write_marker(
                Path(args.run_dir), args.stage, CompletionMarker(args.stage, 0, 1, "touch")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
