"""Lloyd iterations over a distributed shard.

An iteration is an M-step followed by an E-step:

- M-step: per-cluster sums and counts of the current assignment, accumulated in
  ``accum_dtype`` (float64 by default) with ``index_add_``/``bincount`` and all-reduced;
  a cluster that received no point keeps its previous centroid (counted and logged).
- E-step: every point moves to its nearest centroid, squared L2 through
  ``||x||^2 - 2 x.c + ||c||^2`` (see ``lib.kmeans.assign``).

The first E-step runs on the initial centroids, so ``n_iters`` counts centroid updates,
as scikit-learn's ``max_iter`` and faiss's ``niter`` do, and the returned assignment is
that of the returned centroids. The loop stops early when the assignment did not change
(the following iterations would repeat the same centroids: "strict convergence") or, with
``tol > 0``, when the summed squared centroid shift is at most ``tol`` times the mean
per-feature variance of the data (scikit-learn's definition).

E-step with bounds (``bounds=True``, the CPU default): Hamerly's algorithm. Each point
keeps an upper bound ``u`` on the distance to its centroid and a lower bound ``l`` on the
distance to every other centroid; after an update moving centroid j by ``drift_j``,
``u += drift_a`` and ``l -= max_{j != a} drift_j`` (triangle inequality). Only points with
``u > l`` get a full nearest-centroid search. The decisions are those of plain Lloyd:
bounds are widened by a bound on the floating-point error of the distance formula, so a
point is skipped only when its assignment provably stands. Late iterations,
where most centroids hardly move, skip most of the matrix products.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from lib.compute.comm import Comm
from lib.kmeans.assign import Centroids, direct_sq_distances, nearest
from lib.kmeans.points import Shard

log = logging.getLogger(__name__)

ACCUM_BLOCK_ROWS = 4096
# Rows per gather (bounds search, final distances): temporaries stay a few MB whatever
# chunk_rows is, so a rank's memory is its shard plus O(k·D).
GATHER_ROWS = 8192


@dataclass
class LloydResult:
    """What Lloyd returns on each rank.

    ``centroids`` (k, D) float64 and ``inertia`` are the same on every rank;
    ``assignment`` (int64) and ``sq_distances`` (float64; computed from the difference
    ``x - c`` in the compute dtype, so without the cancellation of the expanded formula)
    cover this rank's rows only.
    """

    centroids: torch.Tensor
    assignment: torch.Tensor
    sq_distances: torch.Tensor
    inertia: float
    n_iters: int
    converged: bool
    n_empty: int
    history: list[dict] = field(default_factory=list)


def bound_eps(dtype: torch.dtype, dim: int, tf32: bool = False) -> float:
    """Relative error bound of a computed squared distance, times ``||x||^2 + ||c||^2``."""
    eps = 2.0**-10 if tf32 else torch.finfo(dtype).eps
    return (2 * dim + 8) * eps


def accumulate(
    shard: Shard, comm: Comm, assignment: torch.Tensor, k: int, accum_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums (k, D) in ``accum_dtype`` and counts (k,) int64, over all ranks."""
    sums = torch.zeros((k, shard.dim), dtype=accum_dtype, device=shard.device)
    for a, x in shard.chunks():
        for s in range(0, len(x), ACCUM_BLOCK_ROWS):
            e = min(s + ACCUM_BLOCK_ROWS, len(x))
            sums.index_add_(0, assignment[a + s : a + e], x[s:e].to(accum_dtype))
    counts = torch.bincount(assignment, minlength=k).to(torch.int64)
    comm.sum_(sums)
    comm.sum_(counts)
    return sums, counts


def assign_dense(shard: Shard, cents: Centroids) -> torch.Tensor:
    """Nearest centroid of every local row (int64 on the shard's device)."""
    out = torch.empty(shard.n, dtype=torch.int64, device=shard.device)
    for a, x in shard.chunks():
        idx, _, _ = nearest(x, cents)
        out[a : a + len(x)] = idx.to(out.device)
    return out


def final_distances(shard: Shard, cents: Centroids, assignment: torch.Tensor) -> torch.Tensor:
    """``||x - c_a||^2`` of every local row, from the difference (float64 result)."""
    out = torch.empty(shard.n, dtype=torch.float64, device=shard.device)
    for a, x in shard.chunks(min(shard.chunk_rows, GATHER_ROWS)):
        b = a + len(x)
        out[a:b] = direct_sq_distances(x, cents.c, assignment[a:b]).to(out.device)
    return out


class HamerlyBounds:
    """Per-point assignment with Hamerly upper/lower bounds (see module docstring)."""

    def __init__(self, shard: Shard, cents: Centroids, tf32: bool = False) -> None:
        self.shard = shard
        self.xn = shard.norms()
        self.eps = bound_eps(shard.dtype, shard.dim, tf32)
        n, dev = shard.n, shard.device
        self.a = torch.empty(n, dtype=torch.int64, device=dev)
        self.u = torch.empty(n, dtype=torch.float64, device=dev)
        self.l = torch.empty(n, dtype=torch.float64, device=dev)
        for a, x in shard.chunks():
            rows = torch.arange(a, a + len(x), device=dev)
            self._search(rows, x, cents)

    def _margin(self, rows: torch.Tensor, cents: Centroids) -> torch.Tensor:
        return self.eps * (self.xn[rows] + cents.max_sqnorm)

    def _search(self, rows: torch.Tensor, x: torch.Tensor, cents: Centroids) -> torch.Tensor:
        """Full nearest-centroid search for ``rows``; returns how many changed centroid."""
        idx, s1, s2 = nearest(x, cents, second=True)
        idx = idx.to(self.a.device)
        xn = self.xn[rows]
        mg = self._margin(rows, cents)
        changed = (self.a[rows] != idx).sum()
        self.a[rows] = idx
        self.u[rows] = (s1.to(self.u) + xn + mg).clamp_(min=0).sqrt_()
        self.l[rows] = (s2.to(self.l) + xn - mg).clamp_(min=0).sqrt_()
        return changed

    def move(self, drift: torch.Tensor) -> None:
        """Widen the bounds after centroid ``j`` moved by ``drift[j]``."""
        if len(drift) > 1:
            top, which = torch.topk(drift, 2)
            self.l -= torch.where(self.a == which[0], top[1], top[0])
        else:
            self.l -= drift[0]
        self.u += drift[self.a]

    def estep(self, cents: Centroids) -> tuple[int, int]:
        """Search again the points whose bounds no longer prove their assignment.

        Returns (points that changed centroid, points searched) on this rank. (Hamerly's
        extra step of first recomputing ``u`` alone is left out: gathering each point's
        centroid costs nearly as much as the blocked search it would save.)
        """
        active = torch.nonzero(self.u > self.l).squeeze(1)
        changed = torch.zeros((), dtype=torch.int64, device=self.a.device)
        step = min(self.shard.chunk_rows, GATHER_ROWS)
        for s in range(0, len(active), step):
            rows = active[s : s + step]
            changed += self._search(rows, self.shard.gather(rows), cents)
        return int(changed.item()), len(active)


def lloyd(
    shard: Shard,
    comm: Comm,
    init: torch.Tensor,
    *,
    n_iters: int = 50,
    tol: float = 0.0,
    accum_dtype: torch.dtype = torch.float64,
    bounds: bool = True,
    tf32: bool = False,
) -> LloydResult:
    """Run Lloyd from ``init`` (k, D) over the points of ``shard`` (collectives via ``comm``).

    Returns a ``LloydResult``. Raises ``ValueError`` for ``n_iters < 0`` or ``tol < 0``.
    """
    if n_iters < 0 or tol < 0:
        raise ValueError(f"n_iters and tol must be >= 0, got n_iters={n_iters}, tol={tol}")
    k = init.shape[0]
    centroids = init.to(device=shard.device, dtype=torch.float64).clone()
    cents = Centroids(centroids, shard.dtype, shard.device)
    if bounds:
        state = HamerlyBounds(shard, cents, tf32)
        assignment = state.a
    else:
        state = None
        assignment = assign_dense(shard, cents)
    history: list[dict] = []
    tol_abs: float | None = None
    converged = False
    n_empty = 0
    done = 0
    for it in range(1, n_iters + 1):
        sums, counts = accumulate(shard, comm, assignment, k, accum_dtype)
        empty = counts == 0
        n_empty = int(empty.sum().item())
        new = torch.where(
            empty[:, None], centroids, sums.to(torch.float64) / counts.clamp(min=1)[:, None]
        )
        if tol > 0 and tol_abs is None:
            tol_abs = tol * _mean_variance(shard, comm, sums, counts)
        new_cents = Centroids(new, shard.dtype, shard.device)
        # Drift of the centroids the kernels actually use (rounded to the compute dtype).
        drift = torch.linalg.vector_norm(
            new_cents.c.to(torch.float64) - cents.c.to(torch.float64), dim=1
        ) * (1 + 1e-12)
        shift = float(((new - centroids) ** 2).sum().item())
        centroids, cents = new, new_cents
        done = it
        if state is not None:
            state.move(drift)
            changed, searched = state.estep(cents)
        else:
            previous = assignment
            assignment = assign_dense(shard, cents)
            changed, searched = int((assignment != previous).sum().item()), shard.n
        stats = torch.tensor([changed, searched], dtype=torch.int64, device=shard.device)
        comm.sum_(stats)
        changed, searched = int(stats[0].item()), int(stats[1].item())
        history.append(
            {"iter": it, "changed": changed, "searched": searched, "empty": n_empty, "shift": shift}
        )
        if n_empty:
            log.info(
                "k-means iteration %d: %d empty clusters kept their previous centroid", it, n_empty
            )
        log.debug(
            "k-means iteration %d: %d points changed, %d searched, shift %.3g",
            it,
            changed,
            searched,
            shift,
        )
        if changed == 0:
            converged = True
            break
        if tol_abs is not None and shift <= tol_abs:
            converged = True
            break
    sq = final_distances(shard, cents, assignment)
    inertia = comm.sum_(sq.sum().reshape(1).clone())
    return LloydResult(
        centroids=centroids,
        assignment=assignment,
        sq_distances=sq,
        inertia=float(inertia.item()),
        n_iters=done,
        converged=converged,
        n_empty=n_empty,
        history=history,
    )


def _mean_variance(shard: Shard, comm: Comm, sums: torch.Tensor, counts: torch.Tensor) -> float:
    """Mean over features of the data variance, from the first M-step's totals."""
    n = float(counts.sum().item())
    mean = sums.to(torch.float64).sum(0) / n
    sq = comm.sum_(shard.norms().sum().reshape(1).clone())
    return float(((sq / n).item() - float((mean * mean).sum().item())) / shard.dim)
