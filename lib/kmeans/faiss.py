"""``backend="faiss"``: faiss-cpu's Lloyd iterations, for comparison and small problems.

One CPU process only (raises ``ConfigError`` otherwise); the whole point set is loaded
into memory and ``faiss.Kmeans`` runs the Lloyd iterations from our initial centroids
(``init="kmeans++"``/``"random"``) or faiss's own (``init="faiss"``). faiss handles empty
clusters by splitting large ones, unlike our backend. Final distances are ours (from the
difference ``x - c``, summed in float64), so inertias compare directly.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from lib.compute.comm import Comm
from lib.core.errors import ConfigError
from lib.kmeans.assign import Centroids
from lib.kmeans.lloyd import final_distances
from lib.kmeans.params import KmeansParams
from lib.kmeans.points import PointSet, Shard
from lib.kmeans.solver import KMeansResult, initial_centroids


def faiss_kmeans(
    points: PointSet,
    n_clusters: int,
    params: KmeansParams,
    device: torch.device,
    comm: Comm,
    rng: np.random.Generator,
    init_centroids: np.ndarray | torch.Tensor | None,
) -> KMeansResult:
    if comm.world > 1 or device.type != "cpu":
        raise ConfigError(
            f"kmeans backend=faiss runs in a single CPU process, but this job has world size "
            f"{comm.world} on {device}; use backend=torch for distributed or GPU runs"
        )
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise ConfigError("kmeans backend=faiss needs the faiss-cpu package") from exc
    t0 = time.perf_counter()
    x = np.ascontiguousarray(points.read(0, points.n), dtype=np.float32)
    ids = None
    init = None
    if init_centroids is not None:
        init = np.ascontiguousarray(np.asarray(init_centroids), dtype=np.float32)
    elif params.init != "faiss":
        shard = Shard(points, comm, device, "float32", chunk_rows=params.chunk_rows)
        c, ids = initial_centroids(shard, comm, n_clusters, params, rng)
        init = np.ascontiguousarray(c.numpy(), dtype=np.float32)
    t1 = time.perf_counter()
    km = faiss.Kmeans(
        points.dim,
        n_clusters,
        niter=params.n_iters,
        seed=int(params.seed) % (2**31),
        max_points_per_centroid=max(points.n, 1),  # never subsample: same data as ours
        min_points_per_centroid=1,
        verbose=False,
    )
    km.train(x, init_centroids=init)
    _, labels = km.index.search(x, 1)
    t2 = time.perf_counter()
    centroids = km.centroids.astype(np.float64)
    assignment = labels[:, 0].astype(np.int64)
    shard = Shard(points, comm, device, "float32", chunk_rows=params.chunk_rows)
    cents = Centroids(torch.from_numpy(centroids), shard.dtype, device)
    sq = final_distances(shard, cents, torch.from_numpy(assignment)).numpy()
    n_empty = int(n_clusters - len(np.unique(assignment)))
    return KMeansResult(
        centroids=centroids,
        assignment=assignment,
        sq_distances=sq,
        row_range=(0, points.n),
        inertia=float(sq.sum()),
        n_iters=params.n_iters,
        converged=False,
        n_empty=n_empty,
        init_ids=ids,
        seconds={"init": t1 - t0, "lloyd": t2 - t1},
    )
