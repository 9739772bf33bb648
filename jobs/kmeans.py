"""k-means level stage: one level of the hierarchy, as one rank of a distributed job.

The level comes from the stage name (``kmeans_level2`` -> 2); level 1 reads the merged
embeddings (or ``kmeans.embeddings_path``), level L > 1 the centroids of level L-1. All
ranks compute, rank 0 writes (``lib.hierarchical_kmeans.run_level``). A relaunch resumes
from the last complete step; a stop signal is honoured between steps.
"""

from __future__ import annotations

import sys

import torch

from jobs._common import JobContext, log, run_job
from lib import preempt
from lib.errors import DatasetError
from lib.hierarchical_kmeans import run_level
from lib.kmeans_points import Comm
from lib.kmeans_stages import embeddings_source, hierarchy_params, level_of


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def stop_between_steps(comm: Comm):
    """``on_step_done`` callback: every rank stops if any rank got a stop signal (a
    collective, so the ranks stay in step)."""

    def check(level: int, step: str) -> None:
        flag = torch.tensor([1 if preempt.requested() else 0], dtype=torch.int64)
        if int(comm.max_(flag).item()):
            raise preempt.StopRequested(preempt.requested() or "a peer rank's signal")

    return check


def body(ctx: JobContext) -> None:
    from lib.distributed import process_group

    level = level_of(ctx.spec.name)
    params = hierarchy_params(ctx.cfg)
    device = resolve_device(str(ctx.cfg.kmeans.device))
    embeddings = embeddings_source(ctx.cfg, ctx.run_dir) if level == 1 else None
    with process_group(device):
        comm = Comm.current()
        try:
            result = run_level(
                ctx.run_dir,
                level,
                params,
                embeddings_path=embeddings,
                device=device,
                comm=comm,
                config_hash=ctx.spec.config_hash,
                stage_hash=ctx.spec.config_hash,
                on_step_done=stop_between_steps(comm),
            )
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise DatasetError(str(exc)) from None
    if comm.is_root:
        log.info(
            "level %d %s: %d points -> %d clusters, inertia %.6g (final step %s)",
            level,
            "already complete" if result.skipped else "done",
            result.n_points,
            result.n_clusters,
            result.inertia,
            result.step,
        )


def main(argv: list[str] | None = None) -> int:
    return run_job("kmeans", body, argv)


if __name__ == "__main__":
    sys.exit(main())
