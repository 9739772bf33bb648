"""Cluster quality metrics of one labelling, computed in row blocks over torch.distributed ranks.

``compute_metrics(X, labels, k, params, scratch)`` takes the points (any 2-D array, usually
a read-only memmap of the embeddings), one cluster id in ``0..k-1`` per point and returns
``ClusterMetrics``: inertia (total and per cluster), Davies-Bouldin, Calinski-Harabasz and
silhouette with scikit-learn's definitions, the simplified silhouette, and a per-cluster
table. Every rank calls it with the same arguments; each rank reads only its contiguous
block of rows, one ``block_rows`` block at a time, and the per-cluster sums are combined
by all-reduce (``lib.compute.comm.Comm``).

Definitions (as scikit-learn, so results agree to rounding):

- the centroid of a cluster is the mean of its points; inertia is the sum of squared
  distances of points to their cluster's centroid;
- labels that no point carries (empty clusters) are ignored, as scikit-learn's
  ``LabelEncoder`` does: with fewer than 2 non-empty clusters (or as many as points)
  silhouette, Davies-Bouldin and Calinski-Harabasz are undefined and raise
  ``ClusterMetricsError``;
- silhouette of a point in a cluster of size 1 is 0.

Memory is bounded by ``block_rows`` and ``k`` (plus O(N) labels): per-point distances go
to memory-mapped scratch files (``lib.formats.arrays`` raw memmaps, each with a sidecar checked on
open), one per rank because node-local scratch is not shared between nodes:

    <scratch>/own_dist.r{rank}          (rows of this rank,) float64  point -> own centroid
    <scratch>/other_dist.r{rank}        (rows,) float64  point -> nearest other centroid
    <scratch>/other_id.r{rank}          (rows,) int64    id of that centroid
    <scratch>/centroid_dist.r{rank}     (k, k)  float64  centroid -> centroid

The exact silhouette streams pairwise distance blocks (``block_rows`` x ``block_rows``)
without storing them; above ``silhouette_exact_max`` points it is estimated on a seeded
random sample of ``sample_size`` points, drawn exactly as scikit-learn's
``silhouette_score(sample_size=..., random_state=seed)`` draws it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lib.compute.comm import Comm
from lib.core.sharding import contiguous_range
from lib.metrics.blocks import (
    blocks,
    check_labels,
    pairwise_euclidean,
    require_clusters,
    rows,
)
from lib.metrics.params import MetricsParams
from lib.metrics.scratch import Scratch
from lib.metrics.silhouette import silhouette, silhouette_sample_rows

log = logging.getLogger(__name__)
F64 = torch.float64


@dataclass
class ClusterMetrics:
    """Scalars (``scalars``) and per-cluster columns (``per_cluster``, length k each)."""

    scalars: dict[str, float | int | str]
    per_cluster: dict[str, np.ndarray]
    silhouette_rows: np.ndarray | None = None  # rows used by a sampled silhouette
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Clusters:
    """Pass 1: per-cluster sizes and sums, and the centroids (means) they give."""

    counts: torch.Tensor  # (k,)
    sums: torch.Tensor  # (k, D)
    centroids: torch.Tensor  # (k, D), NaN for empty clusters
    present: torch.Tensor  # (k,) bool
    present_ids: torch.Tensor  # ids of the non-empty clusters

    @property
    def n_present(self) -> int:
        return int(self.present.sum())


def _cluster_sums(X, labels, k: int, lo: int, hi: int, B: int, comm: Comm) -> _Clusters:
    n, dim = X.shape
    counts = torch.zeros(k, dtype=F64)
    sums = torch.zeros(k, dim, dtype=F64)
    for b0, b1 in blocks(lo, hi, B):
        lab = torch.from_numpy(labels[b0:b1])
        sums.index_add_(0, lab, rows(X, b0, b1, F64))
        counts += torch.bincount(lab, minlength=k).to(F64)
    comm.sum_(counts)
    comm.sum_(sums)
    present = counts > 0
    require_clusters(int(present.sum()), n, "cluster metrics (silhouette, Davies-Bouldin)")
    centroids = sums / counts.clamp(min=1).unsqueeze(1)
    centroids[~present] = float("nan")
    return _Clusters(counts, sums, centroids, present, torch.nonzero(present).squeeze(1))


@dataclass
class _PointSums:
    """Pass 2: per cluster, the sums of point -> own centroid distances (and squares), the
    largest, and the simplified silhouette's sum."""

    sum_d: torch.Tensor
    sum_d2: torch.Tensor
    max_d: torch.Tensor
    simp_sum: torch.Tensor


def _point_distances(
    X,
    labels,
    c: _Clusters,
    scratch: Scratch,
    simplified: bool,
    lo: int,
    hi: int,
    B: int,
    comm: Comm,
) -> _PointSums:
    """Point -> own centroid (and nearest other centroid) of this rank's rows, to scratch
    memmaps, and their per-cluster sums over all ranks."""
    k = len(c.counts)
    own = scratch.create("own_dist", (hi - lo,), "float64")
    other = other_id = None
    if simplified:
        other = scratch.create("other_dist", (hi - lo,), "float64")
        other_id = scratch.create("other_id", (hi - lo,), "int64")
    pc = c.centroids[c.present_ids]
    pc_sq = (pc * pc).sum(1)
    out = _PointSums(*(torch.zeros(k, dtype=F64) for _ in range(4)))
    for b0, b1 in blocks(lo, hi, B):
        lab = torch.from_numpy(labels[b0:b1])
        x = rows(X, b0, b1, F64)
        d2 = ((x - c.centroids[lab]) ** 2).sum(1)
        d = d2.sqrt()
        own[b0 - lo : b1 - lo] = d.numpy()  # one contiguous write per block
        out.sum_d.index_add_(0, lab, d)
        out.sum_d2.index_add_(0, lab, d2)
        out.max_d.scatter_reduce_(0, lab, d, reduce="amax")
        if other is not None:
            dist = pairwise_euclidean(x, pc, (x * x).sum(1), pc_sq)
            # exclude the own cluster: its column in the present-only matrix
            col = torch.searchsorted(c.present_ids, lab)
            dist.scatter_(1, col.unsqueeze(1), float("inf"))
            bmin, barg = dist.min(1)
            other[b0 - lo : b1 - lo] = bmin.numpy()
            other_id[b0 - lo : b1 - lo] = c.present_ids[barg].numpy()
            s = (bmin - d) / torch.maximum(d, bmin)
            out.simp_sum.index_add_(0, lab, torch.nan_to_num(s, nan=0.0))
    own.flush()
    comm.sum_(out.sum_d)
    comm.sum_(out.sum_d2)
    comm.max_(out.max_d)
    comm.sum_(out.simp_sum)
    return out


def _centroid_distances(c: _Clusters, scratch: Scratch) -> torch.Tensor:
    """Centroid -> centroid matrix (k x k; only non-empty clusters are meaningful)."""
    k = len(c.counts)
    pc = c.centroids[c.present_ids]
    pc_sq = (pc * pc).sum(1)
    cc = scratch.create("centroid_dist", (k, k), "float64")
    full = torch.full((k, k), float("nan"), dtype=F64)
    ids = c.present_ids
    full[ids.unsqueeze(1), ids.unsqueeze(0)] = pairwise_euclidean(pc, pc, pc_sq, pc_sq)
    full[ids, ids] = 0.0
    cc[:] = full.numpy()
    cc.flush()
    del cc
    return torch.from_numpy(np.array(scratch.open("centroid_dist", (k, k), "float64")))


def _davies_bouldin(c: _Clusters, p: _PointSums, ccm: torch.Tensor) -> float:
    """Davies-Bouldin on the non-empty clusters (scikit-learn's definition)."""
    intra = (p.sum_d / c.counts.clamp(min=1))[c.present_ids]
    cdist = ccm[c.present_ids][:, c.present_ids].clone()
    if torch.allclose(intra, torch.zeros_like(intra)) or torch.allclose(
        cdist, torch.zeros_like(cdist)
    ):
        return 0.0
    cdist[cdist == 0] = float("inf")
    scores = ((intra.unsqueeze(1) + intra.unsqueeze(0)) / cdist).max(1).values
    return float(scores.mean())


def _calinski_harabasz(c: _Clusters, p: _PointSums, n: int) -> float:
    n_present = c.n_present
    pc = c.centroids[c.present_ids]
    mean = c.sums.sum(0) / n
    extra_disp = float((c.counts[c.present_ids] * ((pc - mean) ** 2).sum(1)).sum())
    intra_disp = float(p.sum_d2.sum())
    if intra_disp == 0.0:
        return 1.0
    return extra_disp * (n - n_present) / (intra_disp * (n_present - 1))


def _nearest_clusters(c: _Clusters, ccm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(id, distance) of each cluster's nearest other centroid; -1/NaN for empty ones."""
    k = len(c.counts)
    masked = ccm.clone()
    masked[torch.arange(k), torch.arange(k)] = float("inf")
    masked = torch.nan_to_num(masked, nan=float("inf"))
    nearest_d, nearest = masked.min(1)
    ok = c.present & torch.isfinite(nearest_d)
    nearest = torch.where(ok, nearest, torch.full_like(nearest, -1))
    return nearest, torch.where(ok, nearest_d, float("nan"))


def _per_cluster(c: _Clusters, p: _PointSums, ccm: torch.Tensor) -> dict[str, np.ndarray]:
    k = len(c.counts)
    nan = torch.full((k,), float("nan"), dtype=F64)
    size = c.counts.clamp(min=1)
    nearest, nearest_d = _nearest_clusters(c, ccm)
    return {
        "cluster": np.arange(k, dtype=np.int64),
        "size": c.counts.to(torch.int64).numpy(),
        "inertia": torch.where(c.present, p.sum_d2, nan).numpy(),
        "mean_sq_distance": torch.where(c.present, p.sum_d2 / size, nan).numpy(),
        "mean_distance": torch.where(c.present, p.sum_d / size, nan).numpy(),
        "max_distance": torch.where(c.present, p.max_d, nan).numpy(),
        "nearest_cluster": nearest.numpy(),
        "nearest_centroid_distance": nearest_d.numpy(),
    }


def compute_metrics(
    X: np.ndarray,
    labels: np.ndarray,
    k: int,
    params: MetricsParams,
    scratch: Scratch | None = None,
    *,
    comm: Comm | None = None,
    progress: Callable[[str], None] | None = None,
) -> ClusterMetrics:
    """All metrics of ``labels`` (values in ``0..k-1``) on points ``X`` (N, D).

    Call on every rank with the same arguments. Returns the same ``ClusterMetrics`` on
    every rank. Raises ``ClusterMetricsError`` for a labelling of the wrong length, labels
    outside ``0..k-1`` or fewer than 2 non-empty clusters, ``ArrayFormatError`` when a
    scratch memmap disagrees with its sidecar.
    """
    params.validate()
    comm = comm or Comm.current()
    n, dim = X.shape
    labels = check_labels(labels, n, k)
    owns_scratch = scratch is None
    if scratch is None:
        scratch = Scratch(tempfile.mkdtemp(prefix="ef-metrics-"), comm.rank)
    timings: dict[str, float] = {}
    say = progress or (lambda msg: log.info("%s", msg))
    lo, hi = contiguous_range(n, comm.rank, comm.world)
    B = params.block_rows

    t = time.perf_counter()
    c = _cluster_sums(X, labels, k, lo, hi, B, comm)
    timings["centroids"] = time.perf_counter() - t
    say(f"centroids of {c.n_present} non-empty clusters (k={k}, {n} points)")
    t = time.perf_counter()
    p = _point_distances(X, labels, c, scratch, params.simplified_silhouette, lo, hi, B, comm)
    timings["point_centroid"] = time.perf_counter() - t
    t = time.perf_counter()
    ccm = _centroid_distances(c, scratch)
    timings["centroid_centroid"] = time.perf_counter() - t

    scalars: dict[str, float | int | str] = {
        "n_points": n,
        "dim": dim,
        "k": k,
        "n_clusters": c.n_present,
        "n_empty": k - c.n_present,
        "inertia": float(p.sum_d2.sum()),
        "davies_bouldin": _davies_bouldin(c, p, ccm),
        "calinski_harabasz": _calinski_harabasz(c, p, n),
    }
    per = _per_cluster(c, p, ccm)
    nan = torch.full((k,), float("nan"), dtype=F64)
    if params.simplified_silhouette:
        scalars["simplified_silhouette"] = float(p.simp_sum.sum()) / n
        per["simplified_silhouette"] = torch.where(
            c.present, p.simp_sum / c.counts.clamp(min=1), nan
        ).numpy()

    # Silhouette: exact, or on a seeded sample.
    t = time.perf_counter()
    sil_rows = None
    if params.silhouette_exact_max > 0:
        if n <= params.silhouette_exact_max:
            sil_points, sil_labels, method = X, labels, "exact"
        else:
            sil_rows = silhouette_sample_rows(n, params.sample_size, params.seed)
            order = np.sort(sil_rows)  # sorted rows read the memmap sequentially
            sil_points, sil_labels, method = X[order], labels[order], "sampled"
            sil_rows = order
        say(f"silhouette ({method}) on {len(sil_labels)} points")
        s_mean, s_sum_k, s_cnt_k = silhouette(
            sil_points, sil_labels, k, params, comm=comm, progress=say
        )
        scalars["silhouette"] = s_mean
        scalars["silhouette_method"] = method
        scalars["silhouette_points"] = len(sil_labels)
        per["silhouette"] = torch.where(s_cnt_k > 0, s_sum_k / s_cnt_k.clamp(min=1), nan).numpy()
        per["silhouette_points"] = s_cnt_k.to(torch.int64).numpy()
    timings["silhouette"] = time.perf_counter() - t
    if owns_scratch:
        scratch.cleanup()
    return ClusterMetrics(scalars, per, sil_rows, timings)
