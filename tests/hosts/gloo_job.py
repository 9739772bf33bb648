"""A distributed job for the hosts launcher's tests: every rank joins torch.distributed
(gloo, through lib.compute.distributed as k-means and metrics do), all-reduces its
rank + 1, writes what it got, and rank 0 writes the marker."""

import os
import sys

import torch
import torch.distributed as dist

from lib.compute.distributed import process_group
from lib.core.markers import CompletionMarker, write_marker
from tests.job_start import job_start


def main() -> int:
    args, ident, paths = job_start()
    with process_group(timeout_s=120) as de:
        t = torch.tensor([float(de.rank + 1)])
        dist.all_reduce(t)
        record = {"rank": de.rank, "world": de.world_size, "sum": t.item(),
                  "host": os.environ.get("EMBEDFLEET_HOST"),
                  "ifname": os.environ.get("GLOO_SOCKET_IFNAME")}  # fmt: skip
        paths.storage.publish_json(f"{args.stage}/out/{de.rank}.json", record)
    if ident.rank == 0:
        marker = CompletionMarker(args.stage, ident.task_index, ident.num_tasks, "h")
        write_marker(paths.storage, paths.marker(args.stage, ident.task_index), marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
