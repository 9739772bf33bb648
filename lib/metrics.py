"""Cluster quality metrics of one labelling, computed in row blocks over torch.distributed ranks.

``compute_metrics(X, labels, k, params, scratch)`` takes the points (any 2-D array, usually
a read-only memmap of the embeddings), one cluster id in ``0..k-1`` per point and returns
``ClusterMetrics``: inertia (total and per cluster), Davies-Bouldin, Calinski-Harabasz and
silhouette with scikit-learn's definitions, the simplified silhouette, and a per-cluster
table. Every rank calls it with the same arguments; each rank reads only its contiguous
block of rows, one ``block_rows`` block at a time, and the per-cluster sums are combined
by all-reduce (``lib.kmeans_points.Comm``).

Definitions (as scikit-learn, so results agree to rounding):

- the centroid of a cluster is the mean of its points; inertia is the sum of squared
  distances of points to their cluster's centroid;
- labels that no point carries (empty clusters) are ignored, as scikit-learn's
  ``LabelEncoder`` does: with fewer than 2 non-empty clusters (or as many as points)
  silhouette, Davies-Bouldin and Calinski-Harabasz are undefined and raise
  ``ClusterMetricsError``;
- silhouette of a point in a cluster of size 1 is 0.

Memory is bounded by ``block_rows`` and ``k`` (plus O(N) labels): per-point distances go
to memory-mapped scratch files (``lib.arrays`` raw memmaps, each with a sidecar checked on
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lib.arrays import create_memmap, open_memmap
from lib.errors import EmbedfleetError
from lib.kmeans_points import Comm
from lib.sharding import contiguous_range

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class ClusterMetricsError(EmbedfleetError, ValueError):
    """The labelling does not allow a metric (one cluster, wrong length, bad labels)."""


@dataclass(frozen=True)
class MetricsParams:
    """How the metrics are computed (the ``metrics`` config section holds the same keys).

    ``silhouette_exact_max``: the exact silhouette is computed up to this many points, a
    sampled estimate beyond (``sample_size`` points drawn with ``seed``); 0 disables the
    silhouette. ``block_rows``: rows per block (memory ~ block_rows^2 * 8 bytes for the
    silhouette, block_rows * (D + k) * 8 otherwise). ``compute_dtype``: dtype of the
    pairwise products (float64 matches scikit-learn to ~1e-12; float32 is faster).
    """

    silhouette_exact_max: int = 20000
    sample_size: int = 10000
    block_rows: int = 2048
    seed: int = 0
    compute_dtype: str = "float64"
    simplified_silhouette: bool = True
    resident_bytes: int = 512 << 20
    silhouette_acc_bytes: int = 256 << 20

    def validate(self) -> None:
        if self.block_rows < 1:
            raise ClusterMetricsError(f"metrics.block_rows must be >= 1, got {self.block_rows}")
        if self.sample_size < 2:
            raise ClusterMetricsError(f"metrics.sample_size must be >= 2, got {self.sample_size}")
        if self.silhouette_exact_max < 0:
            raise ClusterMetricsError(
                f"metrics.silhouette_exact_max must be >= 0, got {self.silhouette_exact_max}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ClusterMetricsError(
                f"metrics.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                f"got {self.compute_dtype!r}"
            )


@dataclass
class ClusterMetrics:
    """Scalars (``scalars``) and per-cluster columns (``per_cluster``, length k each)."""

    scalars: dict[str, float | int | str]
    per_cluster: dict[str, np.ndarray]
    silhouette_rows: np.ndarray | None = None  # rows used by a sampled silhouette
    timings: dict[str, float] = field(default_factory=dict)


# -- scratch memmaps ----------------------------------------------------------------------
class Scratch:
    """This rank's memory-mapped scratch arrays under ``dir`` (each with a sidecar).

    ``create`` writes the sidecar and sizes the file; ``open`` re-opens it checking the
    sidecar against the expected shape and dtype (``ArrayFormatError`` on a mismatch).
    """

    def __init__(self, dir: str | Path, rank: int = 0) -> None:
        self.dir = Path(dir)
        self.rank = rank
        self.paths: list[Path] = []

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.r{self.rank}"

    def create(self, name: str, shape: tuple[int, ...], dtype: str) -> np.memmap:
        p = self.path(name)
        self.paths.append(p)
        return create_memmap(p, shape, dtype)

    def open(self, name: str, shape: tuple[int, ...], dtype: str, mode: str = "r") -> np.memmap:
        return open_memmap(self.path(name), mode, shape=shape, dtype=dtype)

    def cleanup(self) -> None:
        """Remove this rank's files (and the dir when it is left empty)."""
        for p in self.paths:
            p.unlink(missing_ok=True)
            p.with_name(p.name + ".json").unlink(missing_ok=True)
        self.paths.clear()
        for d in (self.dir, self.dir.parent):
            try:
                d.rmdir()
            except OSError:
                break


# -- helpers ------------------------------------------------------------------------------
def check_labels(labels: np.ndarray, n: int, k: int, what: str = "labels") -> np.ndarray:
    """``labels`` as int64, checked: one per point, each in ``0..k-1``."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ClusterMetricsError(
            f"{what} has shape {list(labels.shape)} but there are {n} points: the clustering "
            "was computed on other embeddings; point the clustering at the embeddings it used"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ClusterMetricsError(f"{what} must be integers, found dtype {labels.dtype}")
    labels = np.array(labels, dtype=np.int64)  # a private, writable copy (torch views it)
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        bad = int(np.flatnonzero((labels < 0) | (labels >= k))[0])
        raise ClusterMetricsError(
            f"{what}[{bad}] = {int(labels[bad])} is outside 0..{k - 1} (k={k} centroids)"
        )
    return labels


def require_clusters(n_labels: int, n_samples: int, metric: str) -> None:
    """scikit-learn's ``check_number_of_labels``, with a message saying what to do."""
    if n_labels < 2:
        raise ClusterMetricsError(
            f"{metric} is undefined for {n_labels} non-empty cluster(s): it compares clusters "
            "with each other; use a level with at least 2 clusters (or drop this level from "
            "metrics.levels)"
        )
    if n_labels >= n_samples:
        raise ClusterMetricsError(
            f"{metric} is undefined when every one of the {n_samples} points is its own "
            f"cluster ({n_labels} labels); it needs 2..n_samples-1 clusters"
        )


def _blocks(start: int, stop: int, size: int):
    for b0 in range(start, stop, size):
        yield b0, min(b0 + size, stop)


def _rows(X: np.ndarray, b0: int, b1: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(X[b0:b1])).to(dtype)


def pairwise_euclidean(
    a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor
) -> torch.Tensor:
    """Euclidean distances ``|a_i - b_j|`` by the expanded product (clamped at 0)."""
    d2 = torch.addmm(b_sq.unsqueeze(0), a, b.T, alpha=-2.0).add_(a_sq.unsqueeze(1))
    return d2.clamp_(min=0.0).sqrt_()


# -- the metrics --------------------------------------------------------------------------
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
        import tempfile

        scratch = Scratch(tempfile.mkdtemp(prefix="ef-metrics-"), comm.rank)
    timings: dict[str, float] = {}
    say = progress or (lambda msg: log.info("%s", msg))
    lo, hi = contiguous_range(n, comm.rank, comm.world)
    rows = hi - lo
    B = params.block_rows
    f64 = torch.float64

    # Pass 1: sizes and sums per cluster -> centroids (means of the points).
    t = time.perf_counter()
    counts = torch.zeros(k, dtype=f64)
    sums = torch.zeros(k, dim, dtype=f64)
    for b0, b1 in _blocks(lo, hi, B):
        lab = torch.from_numpy(labels[b0:b1])
        sums.index_add_(0, lab, _rows(X, b0, b1, f64))
        counts += torch.bincount(lab, minlength=k).to(f64)
    comm.sum_(counts)
    comm.sum_(sums)
    present = counts > 0
    n_present = int(present.sum())
    require_clusters(n_present, n, "cluster metrics (silhouette, Davies-Bouldin)")
    centroids = sums / counts.clamp(min=1).unsqueeze(1)
    centroids[~present] = float("nan")
    timings["centroids"] = time.perf_counter() - t
    say(f"centroids of {n_present} non-empty clusters (k={k}, {n} points)")

    # Pass 2: point -> own centroid (and nearest other centroid), to scratch memmaps.
    t = time.perf_counter()
    own = scratch.create("own_dist", (rows,), "float64")
    other = other_id = None
    if params.simplified_silhouette:
        other = scratch.create("other_dist", (rows,), "float64")
        other_id = scratch.create("other_id", (rows,), "int64")
    present_ids = torch.nonzero(present).squeeze(1)
    pc = centroids[present_ids]
    pc_sq = (pc * pc).sum(1)
    sum_d = torch.zeros(k, dtype=f64)
    sum_d2 = torch.zeros(k, dtype=f64)
    max_d = torch.zeros(k, dtype=f64)
    simp_sum = torch.zeros(k, dtype=f64)
    for b0, b1 in _blocks(lo, hi, B):
        lab = torch.from_numpy(labels[b0:b1])
        x = _rows(X, b0, b1, f64)
        d2 = ((x - centroids[lab]) ** 2).sum(1)
        d = d2.sqrt()
        own[b0 - lo : b1 - lo] = d.numpy()  # one contiguous write per block
        sum_d.index_add_(0, lab, d)
        sum_d2.index_add_(0, lab, d2)
        max_d.scatter_reduce_(0, lab, d, reduce="amax")
        if other is not None:
            dist = pairwise_euclidean(x, pc, (x * x).sum(1), pc_sq)
            # exclude the own cluster: its column in the present-only matrix
            col = torch.searchsorted(present_ids, lab)
            dist.scatter_(1, col.unsqueeze(1), float("inf"))
            bmin, barg = dist.min(1)
            other[b0 - lo : b1 - lo] = bmin.numpy()
            other_id[b0 - lo : b1 - lo] = present_ids[barg].numpy()
            s = (bmin - d) / torch.maximum(d, bmin)
            simp_sum.index_add_(0, lab, torch.nan_to_num(s, nan=0.0))
    own.flush()
    comm.sum_(sum_d)
    comm.sum_(sum_d2)
    comm.max_(max_d)
    comm.sum_(simp_sum)
    timings["point_centroid"] = time.perf_counter() - t

    # Centroid -> centroid matrix (k x k, present clusters only meaningful).
    t = time.perf_counter()
    cc = scratch.create("centroid_dist", (k, k), "float64")
    full = torch.full((k, k), float("nan"), dtype=f64)
    full[present_ids.unsqueeze(1), present_ids.unsqueeze(0)] = pairwise_euclidean(
        pc, pc, pc_sq, pc_sq
    )
    full[present_ids, present_ids] = 0.0
    cc[:] = full.numpy()
    cc.flush()
    del cc
    ccm = torch.from_numpy(np.array(scratch.open("centroid_dist", (k, k), "float64")))
    timings["centroid_centroid"] = time.perf_counter() - t

    scalars: dict[str, float | int | str] = {
        "n_points": n,
        "dim": dim,
        "k": k,
        "n_clusters": n_present,
        "n_empty": k - n_present,
    }
    inertia_k = sum_d2
    scalars["inertia"] = float(inertia_k.sum())

    # Davies-Bouldin on present clusters (scikit-learn's definition).
    intra = (sum_d / counts.clamp(min=1))[present_ids]
    cdist = ccm[present_ids][:, present_ids].clone()
    if torch.allclose(intra, torch.zeros_like(intra)) or torch.allclose(
        cdist, torch.zeros_like(cdist)
    ):
        db = 0.0
    else:
        cdist[cdist == 0] = float("inf")
        scores = ((intra.unsqueeze(1) + intra.unsqueeze(0)) / cdist).max(1).values
        db = float(scores.mean())
    scalars["davies_bouldin"] = db

    # Calinski-Harabasz.
    mean = sums.sum(0) / n
    extra_disp = float((counts[present_ids] * ((pc - mean) ** 2).sum(1)).sum())
    intra_disp = float(inertia_k.sum())
    scalars["calinski_harabasz"] = (
        1.0 if intra_disp == 0.0 else extra_disp * (n - n_present) / (intra_disp * (n_present - 1))
    )

    # Nearest other centroid per cluster.
    masked = ccm.clone()
    masked[torch.arange(k), torch.arange(k)] = float("inf")
    masked = torch.nan_to_num(masked, nan=float("inf"))
    nearest_d, nearest = masked.min(1)
    nearest = torch.where(
        present & torch.isfinite(nearest_d), nearest, torch.full_like(nearest, -1)
    )
    nearest_d = torch.where(present & torch.isfinite(nearest_d), nearest_d, float("nan"))

    nan = torch.full((k,), float("nan"), dtype=f64)
    per = {
        "cluster": np.arange(k, dtype=np.int64),
        "size": counts.to(torch.int64).numpy(),
        "inertia": torch.where(present, inertia_k, nan).numpy(),
        "mean_sq_distance": torch.where(present, inertia_k / counts.clamp(min=1), nan).numpy(),
        "mean_distance": torch.where(present, sum_d / counts.clamp(min=1), nan).numpy(),
        "max_distance": torch.where(present, max_d, nan).numpy(),
        "nearest_cluster": nearest.numpy(),
        "nearest_centroid_distance": nearest_d.numpy(),
    }
    if params.simplified_silhouette:
        scalars["simplified_silhouette"] = float(simp_sum.sum()) / n
        per["simplified_silhouette"] = torch.where(
            present, simp_sum / counts.clamp(min=1), nan
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


def silhouette_sample_rows(n: int, sample_size: int, seed: int) -> np.ndarray:
    """The rows scikit-learn's ``silhouette_score(..., sample_size, random_state=seed)``
    uses (a permutation's first ``sample_size`` entries)."""
    return np.random.RandomState(seed).permutation(n)[: min(sample_size, n)]


def silhouette(
    X: np.ndarray,
    labels: np.ndarray,
    k: int,
    params: MetricsParams,
    *,
    comm: Comm | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Exact mean silhouette of all points of ``X`` (scikit-learn's definition).

    Points are ordered by label, so each block of columns falls into few clusters and is
    summed per cluster with one small product by a 0/1 matrix. The distance blocks
    (``block_rows`` squared) are streamed, never stored. When the per-point, per-cluster
    sums (N x k float64) fit in ``silhouette_acc_bytes``, only the blocks on and above the
    diagonal are computed (distances are symmetric) and the blocks are dealt to the
    ranks round-robin; otherwise each rank takes a contiguous range of rows against all
    points. Data are centred on their mean first (distances are unchanged, the expanded
    product loses less precision). Returns (mean silhouette, per-cluster sum of
    silhouettes (k,), per-cluster point counts (k,)), identical on every rank.
    """
    comm = comm or Comm.current()
    n = X.shape[0]
    labels = check_labels(labels, n, k)
    cnt = np.bincount(labels, minlength=k).astype(np.float64)
    require_clusters(int((cnt > 0).sum()), n, "silhouette")
    dtype = COMPUTE_DTYPES[params.compute_dtype]
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    B = params.block_rows
    pts = _OrderedPoints(X, order, dtype, params.resident_bytes, B)
    sq = pts.sq_norms
    bounds = list(_blocks(0, n, B))
    segs = [_segments(sorted_labels[b0:b1], dtype, X.shape[1]) for b0, b1 in bounds]
    symmetric = n * k * 8 <= params.silhouette_acc_bytes
    if symmetric:
        tiles = [(i, j) for i in range(len(bounds)) for j in range(i, len(bounds))]
        tiles = tiles[comm.rank :: comm.world]
        acc_lo, acc = 0, np.zeros((n, k), dtype=np.float64)
    else:
        lo, hi = contiguous_range(len(bounds), comm.rank, comm.world)
        tiles = [(i, j) for i in range(lo, hi) for j in range(len(bounds))]
        acc_lo = bounds[lo][0] if lo < hi else 0
        acc_hi = bounds[hi - 1][1] if lo < hi else 0
        acc = np.zeros((acc_hi - acc_lo, k), dtype=np.float64)
    t0 = time.perf_counter()
    step = max(1, len(tiles) // 10)
    for t, (i, j) in enumerate(tiles):
        (r0, r1), (c0, c1) = bounds[i], bounds[j]
        xr = pts.block(r0, r1)
        xc = xr if i == j else pts.block(c0, c1)
        d = pairwise_euclidean(xr, xc, sq[r0:r1], sq[c0:c1])
        if i == j:  # a point's distance to itself is 0 (as scikit-learn sets it)
            d.fill_diagonal_(0.0)
        _add_segments(acc, r0 - acc_lo, d, segs[j])
        if symmetric and i != j:
            _add_segments(acc, c0 - acc_lo, d.T, segs[i])
        if progress is not None and (t + 1) % step == 0:
            progress(
                f"silhouette: {t + 1}/{len(tiles)} blocks on rank {comm.rank} "
                f"({time.perf_counter() - t0:.1f}s)"
            )
    if symmetric:
        acc_t = torch.from_numpy(acc)
        comm.sum_(acc_t)
        lo_r, hi_r = contiguous_range(n, comm.rank, comm.world)
        acc, acc_lo = acc[lo_r:hi_r], lo_r
    lab = sorted_labels[acc_lo : acc_lo + acc.shape[0]]
    rows = np.arange(acc.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        a = acc[rows, lab] / (cnt[lab] - 1)
        mean_other = acc / cnt
        mean_other[:, cnt == 0] = np.inf
        mean_other[rows, lab] = np.inf
        b = mean_other.min(1) if k > 1 else np.full(len(rows), np.inf)
        s = np.nan_to_num((b - a) / np.maximum(a, b))  # 0 for clusters of size 1
    s_sum = torch.zeros(k, dtype=torch.float64)
    s_sum.index_add_(0, torch.from_numpy(lab), torch.from_numpy(s))
    comm.sum_(s_sum)
    return float(s_sum.sum()) / n, s_sum, torch.from_numpy(cnt)


class _OrderedPoints:
    """Points in label order, centred, in the compute dtype: held in memory when they fit
    ``resident_bytes``, else read block by block (sorted reads) on every use."""

    def __init__(
        self, X: np.ndarray, order: np.ndarray, dtype: torch.dtype, budget: int, block: int
    ) -> None:
        self.X, self.order, self.dtype, self.blk = X, order, dtype, block
        n, dim = X.shape
        total = torch.zeros(dim, dtype=torch.float64)
        for b0, b1 in _blocks(0, n, block):
            total += _rows(X, b0, b1, torch.float64).sum(0)
        self.mean = total / max(n, 1)
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.resident = None
        if n * dim * itemsize <= budget:
            self.resident = torch.empty((n, dim), dtype=dtype)
            for b0, b1 in _blocks(0, n, block):
                self.resident[b0:b1] = self._read(b0, b1)
        sq = torch.empty(n, dtype=dtype)
        for b0, b1 in _blocks(0, n, block):
            x = self.block(b0, b1)
            sq[b0:b1] = (x * x).sum(1)
        self.sq_norms = sq

    def _read(self, b0: int, b1: int) -> torch.Tensor:
        idx = self.order[b0:b1]
        srt = np.argsort(idx, kind="stable")
        out = np.empty((b1 - b0, self.X.shape[1]), dtype=self.X.dtype)
        out[srt] = self.X[idx[srt]]  # sorted reads on a memmap
        return (torch.from_numpy(out).to(torch.float64) - self.mean).to(self.dtype)

    def block(self, b0: int, b1: int) -> torch.Tensor:
        if self.resident is not None:
            return self.resident[b0:b1]
        return self._read(b0, b1)


def _segments(
    block_labels: np.ndarray, dtype: torch.dtype, dim: int
) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
    """(cluster ids, start offsets, 0/1 matrix or None) of a label-sorted block's runs.

    The 0/1 matrix (columns x runs) sums a block's columns per cluster with one product;
    when a block holds many small clusters that product would cost more than the
    distances, and ``np.add.reduceat`` is used instead (matrix ``None``).
    """
    ids, starts = np.unique(block_labels, return_index=True)
    if len(ids) * 4 > max(dim, 16):
        return ids, starts, None
    onehot = torch.zeros((len(block_labels), len(ids)), dtype=dtype)
    run = np.searchsorted(ids, block_labels)
    onehot[torch.arange(len(block_labels)), torch.from_numpy(run)] = 1.0
    return ids, starts, onehot


def _add_segments(
    acc: np.ndarray,
    row0: int,
    d: torch.Tensor,
    seg: tuple[np.ndarray, np.ndarray, torch.Tensor | None],
) -> None:
    ids, starts, onehot = seg
    if onehot is not None:
        part = (d @ onehot).to(torch.float64).numpy()
    else:
        part = np.add.reduceat(d.to(torch.float64).numpy(), starts, axis=1)
    acc[row0 : row0 + d.shape[0], ids] += part
