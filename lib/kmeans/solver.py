"""Distributed k-means over a memory-mapped (N, D) matrix: the solver's public API.

Each rank owns the contiguous rows ``contiguous_range(N, rank, world)`` and reads them in
chunks of ``chunk_rows`` (zero-copy memmap views on CPU when the stored dtype is the
compute dtype); no rank loads the whole matrix. Collectives go through
``lib.compute.comm`` (gloo on CPU, NCCL on CUDA); with world size 1 there are none.

Typical use (a job, inside ``lib.compute.distributed.process_group(device)``)::

    from lib.formats.arrays import open_embeddings
    from lib.kmeans.params import KmeansParams
    from lib.kmeans.solver import PointSet, kmeans

    points = PointSet(open_embeddings("merge/embeddings.npy"))
    res = kmeans(points, 1000, KmeansParams(n_iters=50, seed=0), device="cpu")
    res.centroids       # (k, D) float64, identical on every rank
    res.assignment      # (n_local,) int64 for this rank's rows res.row_range
    res.sq_distances    # (n_local,) float64, ||x - c||^2 from the difference x - c
    res.inertia         # sum over all ranks

Pieces, usable on their own: ``initial_centroids`` (k-means++ or random),
``lloyd`` (``lib.kmeans.lloyd``), ``assign`` (nearest centroid of every row).

Precision (``KmeansParams``, the ``kmeans`` config node):

- ``compute_dtype`` (float32 default): dtype of the distance matrix products. float32 uses
  sgemm; argmin decisions between centroids closer than float32 rounding are arbitrary.
- ``dtype`` (float64 default): per-cluster sums of the M-step and the inertia.
- ``allow_tf32`` (CUDA only, default off): lets cuBLAS use TF32 tensor cores for float32
  products (``torch.backends.cuda.matmul.allow_tf32`` and
  ``torch.set_float32_matmul_precision("high")``, restored afterwards). TF32 keeps 10
  mantissa bits of each input: several times faster on Ampere/Hopper, but distances carry
  ~1e-3 relative error, so near-tied points may be assigned differently than in float32.
  Final distances are recomputed from the difference ``x - c`` and summed in float64.
- ``bounds`` (default: on for CPU, off for CUDA): Hamerly's bounds skip points whose
  assignment provably did not change (same decisions as plain Lloyd, see
  ``lib.kmeans.lloyd``). Not used with TF32 (its error bound is too wide to prune).

Reproducibility: every random draw comes from ``numpy.random.default_rng`` seeded with
``seed`` (or a generator the caller passes), consumed identically on every rank; see
``lib.kmeans.init`` for why world size 1 and N pick the same centres. On CPU a row's
distances do not depend on which rows share its BLAS call (one call shape per problem,
``lib.kmeans.assign.cpu_blocked_product``), so world size, ``chunk_rows`` and the bounds
do not change any decision; only the float64 per-cluster sums are added in a different
order (centroids agree to ~1e-16 relative). On CUDA, cuBLAS chooses kernels by shape and
``index_add_`` uses atomics, so runs agree to rounding, not bit for bit.

``backend="faiss"``: one CPU process only (``lib.kmeans.faiss``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from lib.compute.comm import Comm
from lib.compute.devices import resolve_device
from lib.compute.tensors import torch_dtype
from lib.core.errors import ConfigError
from lib.kmeans.assign import Centroids
from lib.kmeans.init import kmeans_plusplus, random_init
from lib.kmeans.lloyd import assign_dense, final_distances, lloyd
from lib.kmeans.params import DEFAULT_CHUNK_ROWS, KmeansBackend, KmeansParams
from lib.kmeans.points import PointSet, Shard

__all__ = [
    "Comm",
    "KMeansResult",
    "PointSet",
    "assign",
    "initial_centroids",
    "kmeans",
    "make_rng",
    "matmul_precision",
]

log = logging.getLogger(__name__)


@dataclass
class KMeansResult:
    """Result on one rank: global centroids/inertia, this rank's rows' assignment."""

    centroids: np.ndarray  # (k, D) float64
    assignment: np.ndarray  # (n_local,) int64
    sq_distances: np.ndarray  # (n_local,) float64
    row_range: tuple[int, int]  # this rank's points [start, stop)
    inertia: float
    n_iters: int
    converged: bool
    n_empty: int
    init_ids: np.ndarray | None
    seconds: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def make_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator for (seed, *keys): independent streams per level/step/purpose."""
    return np.random.default_rng([int(seed), *(int(k) for k in keys)])


@contextlib.contextmanager
def matmul_precision(device: torch.device, allow_tf32: bool) -> Iterator[None]:
    """Set the float32 matmul precision on CUDA for the duration (no-op on CPU)."""
    if device.type != "cuda":
        yield
        return
    old_flag = torch.backends.cuda.matmul.allow_tf32
    old_precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_flag
        torch.set_float32_matmul_precision(old_precision)


def _use_bounds(params: KmeansParams, device: torch.device) -> bool:
    if params.bounds is not None:
        return params.bounds and not (device.type == "cuda" and params.allow_tf32)
    return device.type == "cpu"


def make_shard(points: PointSet, params: KmeansParams, device: torch.device, comm: Comm) -> Shard:
    """This rank's shard of ``points`` for ``params`` (see ``lib.kmeans.points.Shard``)."""
    return Shard(
        points,
        comm,
        device,
        params.compute_dtype,
        chunk_rows=params.chunk_rows,
        cache_bytes=params.cache_bytes,
    )


def initial_centroids(
    shard: Shard, comm: Comm, n_clusters: int, params: KmeansParams, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    """(k, D) float64 initial centroids and the point ids they were taken from."""
    if n_clusters > shard.points.n:
        raise ConfigError(
            f"n_clusters={n_clusters} is larger than the number of points "
            f"({shard.points.n}); lower n_clusters"
        )
    if params.init == "random":
        return random_init(shard, comm, n_clusters, rng)
    return kmeans_plusplus(shard, comm, n_clusters, rng, params.n_local_trials)


def kmeans(
    points: PointSet,
    n_clusters: int,
    params: KmeansParams | None = None,
    *,
    device: torch.device | str = "cpu",
    comm: Comm | None = None,
    rng: np.random.Generator | None = None,
    init_centroids: np.ndarray | torch.Tensor | None = None,
) -> KMeansResult:
    """Cluster ``points`` into ``n_clusters`` clusters.

    Takes the point set, the number of clusters, the solver settings (default:
    ``KmeansParams()``), the device of this rank, the collectives (default: the current
    process group), an optional generator (default: seeded with ``params.seed``) and
    optional initial centroids (k, D) that replace the init step. Returns this rank's
    ``KMeansResult``. Raises ``ConfigError`` for invalid settings, k larger than the number
    of points, or ``backend="faiss"`` with world size > 1.
    """
    params = params or KmeansParams()
    params.validate_solver(n_clusters)
    dev = resolve_device(device)
    comm = comm or Comm.current()
    rng = rng or make_rng(params.seed)
    if params.backend == KmeansBackend.faiss:
        from lib.kmeans.faiss import faiss_kmeans

        return faiss_kmeans(points, n_clusters, params, dev, comm, rng, init_centroids)
    with matmul_precision(dev, params.allow_tf32):
        shard = make_shard(points, params, dev, comm)
        t0 = time.perf_counter()
        ids = None
        if init_centroids is None:
            init, ids = initial_centroids(shard, comm, n_clusters, params, rng)
        else:
            init = torch.as_tensor(np.asarray(init_centroids), dtype=torch.float64)
            if tuple(init.shape) != (n_clusters, points.dim):
                raise ConfigError(
                    f"initial centroids have shape {tuple(init.shape)}, "
                    f"expected ({n_clusters}, {points.dim})"
                )
        t1 = time.perf_counter()
        res = lloyd(
            shard,
            comm,
            init,
            n_iters=params.n_iters,
            tol=params.tol,
            accum_dtype=torch_dtype(params.dtype),
            bounds=_use_bounds(params, dev),
            tf32=dev.type == "cuda" and params.allow_tf32,
        )
        t2 = time.perf_counter()
    log.info(
        "k-means k=%d on %d points: %d iterations%s, inertia %.6g, init %.2fs, lloyd %.2fs",
        n_clusters,
        points.n,
        res.n_iters,
        " (converged)" if res.converged else "",
        res.inertia,
        t1 - t0,
        t2 - t1,
    )
    return KMeansResult(
        centroids=res.centroids.cpu().numpy(),
        assignment=res.assignment.cpu().numpy(),
        sq_distances=res.sq_distances.cpu().numpy(),
        row_range=(shard.start, shard.stop),
        inertia=res.inertia,
        n_iters=res.n_iters,
        converged=res.converged,
        n_empty=res.n_empty,
        init_ids=ids,
        seconds={"init": t1 - t0, "lloyd": t2 - t1},
        history=res.history,
    )


def assign(
    points: PointSet,
    centroids: np.ndarray | torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    comm: Comm | None = None,
    compute_dtype: str = "float32",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    cache_bytes: int | None = None,
    allow_tf32: bool = False,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Nearest centroid of each of this rank's points.

    Returns ``(assignment int64, squared distances float64, row_range)`` (distances from
    the difference ``x - c``, see ``lib.kmeans.lloyd.final_distances``)
    for the rows ``row_range`` of the point set.
    """
    dev = resolve_device(device)
    comm = comm or Comm.current()
    c64 = torch.as_tensor(np.asarray(centroids), dtype=torch.float64).to(dev)
    with matmul_precision(dev, allow_tf32):
        shard = Shard(
            points, comm, dev, compute_dtype, chunk_rows=chunk_rows, cache_bytes=cache_bytes
        )
        cents = Centroids(c64, shard.dtype, dev)
        a = assign_dense(shard, cents)
        sq = final_distances(shard, cents, a)
    return a.cpu().numpy(), sq.cpu().numpy(), (shard.start, shard.stop)
