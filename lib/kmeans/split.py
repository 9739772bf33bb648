"""Split mode (``n_splits > 1``): each cluster of a level's step 0 is a pre-cluster, split
into ``min(n_splits, size)`` clusters by its own k-means; empty sub-clusters are dropped.

Pre-clusters are shared out to ranks in contiguous ranges; each is solved by one rank
alone (``Comm.solo()``), and rank 0 gathers and publishes the final clusters (step
``split``).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from lib.compute.comm import Comm
from lib.core.paths import RunPaths
from lib.core.sharding import contiguous_range
from lib.formats.clusters import StepOutputs
from lib.kmeans.outputs import gather_to_root, publish_step
from lib.kmeans.params import KmeansParams
from lib.kmeans.points import PointSet
from lib.kmeans.solver import kmeans, make_rng

log = logging.getLogger(__name__)

SPLIT_STEP = "split"
_SPLIT_SEED = 1_000_000  # the "step" number of split mode in seeds (steps stay small)
SPLIT_STREAM = 2  # make_rng stream key of split mode


def run_split(
    paths: RunPaths,
    stage: str,
    level: int,
    params: KmeansParams,
    data: np.ndarray,
    h: str,
    dev: torch.device,
    comm: Comm,
    out_dtype: np.dtype,
) -> dict:
    """Compute and publish the split step of ``level``; return its summary."""
    started = time.time()
    n_splits = params.per_level("n_splits", level)
    offsets, members = StepOutputs.at(paths, level, "step0").members()
    n_pre = len(offsets) - 1
    lo, hi = contiguous_range(n_pre, comm.rank, comm.world)
    cents, pts, labels, dists = [], [], [], []
    for c in range(lo, hi):
        idx = np.sort(np.asarray(members[offsets[c] : offsets[c + 1]]))
        if len(idx) == 0:
            continue
        kc = min(n_splits, len(idx))
        res = kmeans(
            PointSet(data, idx),
            kc,
            params,
            device=dev,
            comm=Comm.solo(),
            rng=make_rng(params.seed, level, _SPLIT_SEED + c, SPLIT_STREAM),
        )
        used, local = np.unique(res.assignment, return_inverse=True)  # drop empty sub-clusters
        base = sum(len(x) for x in cents)
        cents.append(res.centroids[used])
        pts.append(idx)
        labels.append(local.astype(np.int64) + base)
        dists.append(res.sq_distances)
    dim = data.shape[1]
    my_c = np.concatenate(cents) if cents else np.empty((0, dim))
    my_p = np.concatenate(pts) if pts else np.empty(0, dtype=np.int64)
    my_l = np.concatenate(labels) if labels else np.empty(0, dtype=np.int64)
    my_d = np.concatenate(dists) if dists else np.empty(0)
    counts = gather_to_root(comm, np.array([len(my_c)], dtype=np.int64))
    all_c = gather_to_root(comm, my_c.astype(np.float64))
    label_counts = gather_to_root(comm, np.array([len(my_l)], dtype=np.int64))
    all_p = gather_to_root(comm, my_p)
    all_l = gather_to_root(comm, my_l)
    all_d = gather_to_root(comm, my_d.astype(np.float64))
    inertia = float(comm.sum_(torch.tensor([float(my_d.sum())], dtype=torch.float64)).item())
    extra = {
        "kind": "split",
        "inertia": inertia,
        "n_splits": n_splits,
        "pre_clusters": n_pre,
        "world_size": comm.world,
        "device": str(dev),
    }
    if comm.is_root:
        # Local labels count from 0 on each rank: shift by the centroids of earlier ranks.
        shift = np.repeat(np.cumsum(counts) - counts, label_counts)
        n = data.shape[0]
        assignment = np.full(n, -1, dtype=np.int64)
        sq = np.zeros(n, dtype=np.float64)
        assignment[all_p] = all_l + shift
        sq[all_p] = all_d
        if (assignment < 0).any():  # pragma: no cover - every point is in one pre-cluster
            raise RuntimeError("split mode left points without a cluster")
        publish_step(
            paths,
            stage,
            level,
            SPLIT_STEP,
            h,
            all_c,
            assignment,
            sq,
            out_dtype=out_dtype,
            save_distances=params.save_distances,
            sample=None,
            extra=extra,
            started=started,
        )
    comm.barrier()
    total = comm.sum_(torch.tensor([len(my_c)], dtype=torch.int64))
    log.info(
        "k-means level %d split: %d pre-clusters -> %d clusters", level, n_pre, int(total.item())
    )
    return {"step": SPLIT_STEP, "skipped": False, **extra}
