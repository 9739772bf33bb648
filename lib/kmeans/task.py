"""What a k-means level job runs: one level of the hierarchy, as one rank of a distributed
job. Level 1 reads the merged embeddings (or ``kmeans.embeddings_path``), level L > 1 the
centroids of level L-1. A relaunch resumes from the last complete step; a stop signal is
honoured between steps."""

from __future__ import annotations

import logging

import torch

from lib.compute.comm import Comm
from lib.compute.devices import local_world_size, resolve_device
from lib.compute.distributed import process_group
from lib.core.errors import DatasetError
from lib.core.paths import level_of
from lib.kmeans.hierarchy import run_level
from lib.kmeans.outputs import prepare_level
from lib.kmeans.plan import embeddings_source, kmeans_params
from lib.runtime import stop
from lib.runtime.context import TaskContext

log = logging.getLogger(__name__)


def stop_between_steps(comm: Comm):
    """``on_step_done`` callback: every rank stops if any rank got a stop signal (a
    collective, so the ranks stay in step)."""

    def check(level: int, step: str) -> None:
        flag = torch.tensor([1 if stop.requested() else 0], dtype=torch.int64)
        if int(comm.max_(flag).item()):
            raise stop.StopRequested(stop.requested() or "a peer rank's signal")

    return check


def run(ctx: TaskContext) -> None:
    level = level_of(ctx.spec.name)
    params = kmeans_params(ctx.cfg)
    # Before the process group: NCCL binds the group to this rank's device.
    share = bool(ctx.cfg.cluster.get("share_gpus", False))
    device = resolve_device(
        params.device,
        local_rank=ctx.env.local_rank(),
        local_world=local_world_size(ctx.env.env),
        share=share,
        key="kmeans.device",
    )
    try:
        embeddings = embeddings_source(ctx.cfg, ctx.paths) if level == 1 else None
        merged = None
        if level == 1 and not ctx.cfg.kmeans.embeddings_path:
            merged = ctx.paths.merge_embeddings(str(ctx.cfg.merge.formats[0]))
        with process_group(device, shared_gpu=share and device.type == "cuda"):
            comm = Comm.current()
            prepare_level(ctx.paths, level, merged, comm)
            result = run_level(
                ctx.paths,
                level,
                params,
                embeddings_path=embeddings,
                device=device,
                comm=comm,
                config_hash=ctx.spec.config_hash,
                on_step_done=stop_between_steps(comm),
                stage=ctx.spec.name,
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
