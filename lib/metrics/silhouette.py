"""The silhouette of every point (scikit-learn's definition), streamed in distance blocks
that are never stored; ranks share the blocks."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from lib.compute.comm import Comm
from lib.compute.tensors import torch_dtype
from lib.core.sharding import contiguous_range
from lib.metrics.blocks import blocks, check_labels, pairwise_euclidean, require_clusters, rows
from lib.metrics.params import MetricsParams


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
    dtype = torch_dtype(params.compute_dtype)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    B = params.block_rows
    pts = _OrderedPoints(X, order, dtype, params.resident_bytes, B)
    sq = pts.sq_norms
    bounds = list(blocks(0, n, B))
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
        for b0, b1 in blocks(0, n, block):
            total += rows(X, b0, b1, torch.float64).sum(0)
        self.mean = total / max(n, 1)
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.resident = None
        if n * dim * itemsize <= budget:
            self.resident = torch.empty((n, dim), dtype=dtype)
            for b0, b1 in blocks(0, n, block):
                self.resident[b0:b1] = self._read(b0, b1)
        sq = torch.empty(n, dtype=dtype)
        for b0, b1 in blocks(0, n, block):
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
