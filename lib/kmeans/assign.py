"""Nearest-centroid kernels: one matrix product per block of rows, then a row-wise argmin.

``argmin_j ||x - c_j||^2 = argmin_j (||c_j||^2 - 2 x.c_j)``: the row norm is the same for
every centroid, so it is added only where a distance is needed. The "partial score"
``||c_j||^2 - 2 x.c_j`` is one GEMM (``x @ (-2 C)^T``) plus a broadcast add.

On CPU, blocks of rows that fit in cache are spread over a thread pool, each worker
calling numpy's BLAS single-threaded (OpenBLAS in the numpy wheels; limited through
threadpoolctl), followed by the argmin while the block is still in cache, the same scheme
as scikit-learn's Lloyd. Every call has one shape per problem, which makes a row's result
independent of its neighbours (``cpu_blocked_product``). One-thread calls in our own pool
also avoid a multithreaded BLAS spinning against torch's OpenMP pool, and on the 2-core
AMD machine we measured numpy's OpenBLAS sgemm ran at ~190 GFLOP/s against ~120 for
torch's MKL. On CUDA, one ``addmm`` per block (TF32 when allowed, see ``lib.kmeans.solver``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

CPU_BLOCK_BYTES = 4 << 20  # partial-score block per worker: stays in L2/L3
CUDA_BLOCK_BYTES = 1 << 30

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_blas_controller = None
_tls = threading.local()


class Centroids:
    """Centroids prepared for distance kernels on one device, in the compute dtype."""

    def __init__(self, centroids: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
        c64 = centroids.to(device=device, dtype=torch.float64)
        self.k, self.dim = c64.shape
        self.c64 = c64
        self.c = c64.to(dtype)
        self.neg2t = (-2.0 * self.c).t().contiguous()  # (D, k): scores = x @ neg2t + sqnorm
        self.sqnorm = (c64 * c64).sum(1).to(dtype)
        self.max_sqnorm = float(self.sqnorm.max()) if self.k else 0.0
        self.dtype = dtype
        self.device = device


def _cpu_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != workers:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kmeans")
            _pool_size = workers
        return _pool


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Limit numpy's BLAS to one thread per call while our own workers run in parallel."""
    global _blas_controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        yield
        return
    if _blas_controller is None:
        _blas_controller = ThreadpoolController()
    with _blas_controller.limit(limits=1, user_api="blas"):
        yield


def _thread_buffer(name: str, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """A per-thread scratch array, reused across calls while shape and dtype stay."""
    buf = getattr(_tls, name, None)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = np.zeros(shape, dtype=dtype)
        setattr(_tls, name, buf)
    return buf


def block_rows_for(k: int, device: torch.device, itemsize: int = 4) -> int:
    """Rows per partial-score block: the block of ``rows x k`` scores fits the budget."""
    budget = CPU_BLOCK_BYTES if device.type == "cpu" else CUDA_BLOCK_BYTES
    cap = 8192 if device.type == "cpu" else 1 << 16  # CPU: several blocks per chunk to share out
    return int(max(64, min(cap, budget // max(1, k * itemsize))))


def nearest(
    x: torch.Tensor,
    cents: Centroids,
    *,
    second: bool = False,
    block_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Nearest centroid of every row of ``x``.

    Takes ``x`` (m, D) in the centroids' dtype and device. Returns ``(index, score,
    second_score)``: int64 index of the nearest centroid, its partial score
    ``||c||^2 - 2 x.c`` (add ``||x||^2`` for the squared distance) and, when ``second``,
    the partial score of the runner-up (``inf`` when k == 1), else ``None``.
    Ties go to the lower centroid index.
    """
    m = x.shape[0]
    block = block_rows or block_rows_for(cents.k, x.device, x.element_size())
    if x.device.type == "cpu":
        return _nearest_cpu(x, cents, second, block)
    idx = torch.empty(m, dtype=torch.int64, device=x.device)
    s1 = torch.empty(m, dtype=x.dtype, device=x.device)
    s2 = torch.empty(m, dtype=x.dtype, device=x.device) if second else None
    for a in range(0, m, block):
        b = min(a + block, m)
        scores = torch.addmm(cents.sqnorm, x[a:b], cents.neg2t)
        v, i = scores.min(1)
        idx[a:b], s1[a:b] = i, v
        if s2 is not None:
            if cents.k > 1:
                scores.scatter_(1, i[:, None], float("inf"))
                s2[a:b] = scores.min(1).values
            else:
                s2[a:b] = float("inf")
    return idx, s1, s2


def cpu_blocked_product(
    xs: np.ndarray, w: np.ndarray, block: int, post: Callable[[int, int, np.ndarray], None]
) -> None:
    """Call ``post(a, b, xs[a:b] @ w)`` for consecutive blocks of ``block`` rows.

    Blocks run on the thread pool, one single-threaded BLAS call each. Every call has the
    same shape ``(block, D) @ (D, N)`` (the last block is zero-padded): BLAS libraries pick
    kernels, and so summation orders, by shape, and we measured per-row results that change
    with the number of rows in the call, in OpenBLAS and in MKL alike. With one shape a row's
    products do not depend on the rows that share its call, so any chunking, any world size
    and gathered subsets (the bounds) compute bit-identical scores for the same row.
    ``post`` must only touch rows ``a..b`` of shared outputs.
    """
    m, d = xs.shape
    n = w.shape[1]

    def work(a: int) -> None:
        b = min(a + block, m)
        out = _thread_buffer("out", (block, n), w.dtype)
        src = xs[a:b]
        if b - a < block:
            pad = _thread_buffer("pad", (block, d), xs.dtype)
            pad[: b - a] = src
            src = pad
        np.matmul(src, w, out=out)
        post(a, b, out[: b - a])

    starts = range(0, m, block)
    workers = max(1, torch.get_num_threads())
    with _single_threaded_blas():
        if workers == 1 or len(starts) == 1:
            for a in starts:
                work(a)
        else:
            list(_cpu_pool(workers).map(work, starts))


def _nearest_cpu(
    x: torch.Tensor, cents: Centroids, second: bool, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    m, k = x.shape[0], cents.k
    xs = x.contiguous().numpy()
    cn = cents.sqnorm.numpy()
    idx = np.empty(m, dtype=np.int64)
    s1 = np.empty(m, dtype=xs.dtype)
    s2 = np.empty(m, dtype=xs.dtype) if second else None

    def post(a: int, b: int, scores: np.ndarray) -> None:
        scores += cn
        i = scores.argmin(axis=1)
        rows = np.arange(b - a)
        idx[a:b] = i
        s1[a:b] = scores[rows, i]
        if s2 is not None:
            if k > 1:
                scores[rows, i] = np.inf
                s2[a:b] = scores.min(axis=1)
            else:
                s2[a:b] = np.inf

    cpu_blocked_product(xs, cents.neg2t.numpy(), block, post)
    return (
        torch.from_numpy(idx),
        torch.from_numpy(s1),
        None if s2 is None else torch.from_numpy(s2),
    )


def sq_distances_many(
    x: torch.Tensor,
    xn: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    on_block: Callable[[int, int, np.ndarray | torch.Tensor], None] | None = None,
) -> None:
    """``out[i, j] = ||x_i - y_j||^2`` (expanded, compute dtype, clamped at 0).

    ``x`` (m, D) and ``xn`` (m,) its squared norms; ``y`` (T, D) float64 with T >= 2 for
    a fixed BLAS shape (see ``cpu_blocked_product``). ``on_block(a, b, block)`` is called
    with each finished block of rows ``a..b`` while it is in cache: a numpy array in a
    worker thread on CPU, a tensor on CUDA.
    """
    yc = y.to(x.dtype)
    neg2t = (-2.0 * yc).t().contiguous()
    yn = (y * y).sum(1).to(x.dtype)
    block = block_rows_for(y.shape[0], x.device, x.element_size())
    if x.device.type == "cpu":
        o = out.numpy()
        xnn = xn.to(x.dtype).numpy()
        ynn = yn.numpy()

        def post(a: int, b: int, prod: np.ndarray) -> None:
            np.add(prod, ynn, out=o[a:b])
            o[a:b] += xnn[a:b, None]
            np.maximum(o[a:b], 0, out=o[a:b])
            if on_block is not None:
                on_block(a, b, o[a:b])

        cpu_blocked_product(x.contiguous().numpy(), neg2t.numpy(), block, post)
        return
    xc = xn.to(x.dtype)
    for a in range(0, x.shape[0], block):
        b = min(a + block, x.shape[0])
        torch.addmm(yn, x[a:b], neg2t, out=out[a:b])
        out[a:b] += xc[a:b, None]
        out[a:b].clamp_(min=0)
        if on_block is not None:
            on_block(a, b, out[a:b])


def row_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """``||x_i||^2`` of every row in the compute dtype (a per-row dot product)."""
    if x.device.type == "cpu":
        xs = x.contiguous().numpy()
        return torch.from_numpy(np.einsum("ij,ij->i", xs, xs))
    return (x * x).sum(1)


def direct_sq_distances(x: torch.Tensor, c: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``||x_i - c_{index_i}||^2`` computed from the difference (no cancellation).

    ``x`` (m, D) and ``c`` (k, D) in the compute dtype; returns float64 (m,).
    """
    if x.device.type == "cpu":
        diff = x.contiguous().numpy() - c.numpy()[index.numpy()]
        return torch.from_numpy(np.einsum("ij,ij->i", diff, diff).astype(np.float64))
    diff = x - c.index_select(0, index)
    return (diff * diff).sum(1).to(torch.float64)
