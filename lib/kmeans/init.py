"""Seeded initial centroids for distributed k-means: greedy k-means++ and random.

Both draw every random number from one ``numpy.random.Generator`` that is seeded alike on
every rank and consumed identically everywhere, so all ranks take the same decisions
without exchanging them, and a run with any world size picks the same points.

k-means++ (greedy, as scikit-learn): the first centre is a uniform draw; each later one is
the best of ``2 + int(ln k)`` candidates sampled with probability proportional to the
squared distance to the nearest chosen centre ("potential"), the best being the candidate
that leaves the smallest total potential.

Exact reproducibility across world sizes: potentials are quantised to integers,
``floor(d * 2^e)`` with one power-of-two scale ``2^e`` shared by all ranks (chosen so the
global sum stays below 2^62). Integer sums and cumulative sums are associative, so the
global cumulative sum seen through per-rank totals (all-gathered) and per-rank local
cumulative sums is bit-identical to the single-process one: a drawn integer in
``[0, total)`` names the same point for any world size. Candidate potentials are compared
as integer sums too. The owner of a sampled point contributes its row to a sum
all-reduce (everyone else adds zeros), which hands the row to every rank.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from lib.compute.comm import Comm
from lib.compute.tensors import as_tensor
from lib.kmeans.assign import sq_distances_many
from lib.kmeans.points import Shard

log = logging.getLogger(__name__)

# Sums of quantised potentials stay below 2^62 (int64 has 63 value bits).
_QUANT_BITS = 62


def default_trials(k: int) -> int:
    """scikit-learn's number of k-means++ candidates per centre: ``2 + int(ln k)``."""
    return 2 + int(math.log(k))


def fetch_points(shard: Shard, comm: Comm, points: np.ndarray) -> torch.Tensor:
    """Rows of the given global points, float64 on the shard's device, identical on all ranks.

    Each rank fills the rows it owns from the stored data; a sum all-reduce (the others
    contribute zeros, so the sum is exact) gives every rank all of them.
    """
    points = np.asarray(points, dtype=np.int64)
    out = torch.zeros((len(points), shard.dim), dtype=torch.float64, device=shard.device)
    mine = np.nonzero((points >= shard.start) & (points < shard.stop))[0]
    if len(mine):
        rows = shard.points.take(points[mine])
        out[torch.from_numpy(mine).to(shard.device)] = as_tensor(rows).to(
            device=shard.device, dtype=torch.float64
        )
    return comm.sum_(out)


def random_init(
    shard: Shard, comm: Comm, k: int, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    """``k`` distinct points drawn uniformly. Returns (centroids (k, D) float64, point ids)."""
    ids = rng.choice(shard.points.n, size=k, replace=False).astype(np.int64)
    return fetch_points(shard, comm, ids), ids


def _candidate_sq_distances(shard: Shard, y: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i, j] = ||x_i - y_j||^2`` for every local row, in the compute dtype."""
    xn = shard.norms()
    for a, x in shard.chunks():
        b = a + len(x)
        sq_distances_many(x, xn[a:b], y, out[a:b])


def _candidate_potentials(
    shard: Shard, y: torch.Tensor, closest: torch.Tensor, e: int | None, out: torch.Tensor
) -> torch.Tensor:
    """Fill ``out`` with the candidates' squared distances and return, per candidate, this
    rank's quantised potential ``sum_i floor(min(closest_i, d_ij) * 2^e)`` (int64).

    The potential of each block is summed while the block is in cache (in the CPU worker
    threads); integer sums make the order irrelevant.
    """
    xn = shard.norms()
    trials = y.shape[0]
    if e is None:
        _candidate_sq_distances(shard, y, out)
        return torch.zeros(trials, dtype=torch.int64, device=shard.device)
    partial: list[np.ndarray | torch.Tensor] = []
    cpu = shard.device.type == "cpu"
    closest_np = closest.numpy() if cpu else None
    for a0, x in shard.chunks():
        b0 = a0 + len(x)

        def on_block(a: int, b: int, d: np.ndarray | torch.Tensor, a0: int = a0) -> None:
            if cpu:
                m = np.minimum(d.astype(np.float64), closest_np[a0 + a : a0 + b, None])
                partial.append(np.floor(np.ldexp(m, e)).astype(np.int64).sum(0))
            else:
                m = torch.minimum(d.to(torch.float64), closest[a0 + a : a0 + b, None])
                partial.append(_quantise(m, e).sum(0))

        sq_distances_many(x, xn[a0:b0], y, out[a0:b0], on_block)
    if not partial:
        return torch.zeros(trials, dtype=torch.int64, device=shard.device)
    if cpu:
        return torch.from_numpy(np.sum(partial, axis=0).astype(np.int64))
    return torch.stack(partial).sum(0)


def _scale_exponent(comm: Comm, closest: torch.Tensor, n: int) -> int | None:
    """Exponent ``e`` so that ``sum(floor(closest * 2^e)) < 2^62`` over all ranks; ``None``
    when every potential is zero."""
    peak = closest.max() if len(closest) else torch.zeros((), dtype=torch.float64)
    peak = comm.max_(peak.reshape(1).to(torch.float64).clone())
    m = float(peak.item())
    if m <= 0.0 or not math.isfinite(m):
        return None
    _, p = math.frexp(n * m)  # n*m < 2^p
    return _QUANT_BITS - p


def _quantise(values: torch.Tensor, e: int) -> torch.Tensor:
    # Multiplying by a power of two is exact; floor makes the result an integer.
    return torch.floor(torch.ldexp(values, torch.tensor(float(e), dtype=values.dtype))).to(
        torch.int64
    )


def _sample_points(
    shard: Shard, comm: Comm, q: torch.Tensor, rng: np.random.Generator, trials: int
) -> np.ndarray:
    """Draw ``trials`` global points with probability proportional to ``q`` (int64).

    Identical on every rank for every world size (see module docstring).
    """
    local_cum = torch.cumsum(q, 0)
    local_total = local_cum[-1:] if len(q) else torch.zeros(1, dtype=torch.int64, device=q.device)
    totals = comm.all_gather_rows(local_total.reshape(1)).cpu().numpy()  # (world,)
    ends = np.cumsum(totals)
    grand = int(ends[-1])
    if grand == 0:
        return rng.integers(shard.points.n, size=trials).astype(np.int64)
    targets = rng.integers(grand, size=trials)
    owners = np.searchsorted(ends, targets, side="right")
    found = torch.zeros(trials, dtype=torch.int64, device=q.device)
    mine = np.nonzero(owners == comm.rank)[0]
    if len(mine):
        before = int(ends[comm.rank] - totals[comm.rank])
        local_t = torch.as_tensor(targets[mine] - before, dtype=torch.int64, device=q.device)
        pos = torch.searchsorted(local_cum, local_t, right=True)
        found[torch.from_numpy(mine).to(q.device)] = pos + shard.start
    return comm.sum_(found).cpu().numpy()


def kmeans_plusplus(
    shard: Shard,
    comm: Comm,
    k: int,
    rng: np.random.Generator,
    n_local_trials: int | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Greedy k-means++ over the distributed points of ``shard``.

    Returns ``(centroids, ids)``: (k, D) float64 rows of the chosen points on the shard's
    device and their global point ids (int64). Raises ``ValueError`` if k exceeds the
    number of points.
    """
    n = shard.points.n
    if not 1 <= k <= n:
        raise ValueError(f"k-means++ needs 1 <= k <= number of points ({n}), got k={k}")
    trials = n_local_trials or default_trials(k)
    centers = torch.empty((k, shard.dim), dtype=torch.float64, device=shard.device)
    ids = np.empty(k, dtype=np.int64)

    ids[0] = int(rng.integers(n))
    centers[0] = fetch_points(shard, comm, ids[:1])[0]
    # The first centre twice: one product shape for every step (see cpu_blocked_product).
    first = torch.empty((shard.n, 2), dtype=shard.dtype, device=shard.device)
    _candidate_sq_distances(shard, centers[[0, 0]], first)
    closest = first[:, 0].to(torch.float64)
    cand_d = torch.empty((shard.n, trials), dtype=shard.dtype, device=shard.device)

    for c in range(1, k):
        e = _scale_exponent(comm, closest, n)
        q = _quantise(closest, e) if e is not None else torch.zeros_like(closest, dtype=torch.int64)
        cand = _sample_points(shard, comm, q, rng, trials)
        y = fetch_points(shard, comm, cand)
        pots = _candidate_potentials(shard, y, closest, e, cand_d)
        best = int(torch.argmin(comm.sum_(pots)).item())
        ids[c] = cand[best]
        centers[c] = y[best]
        closest = torch.minimum(closest, cand_d[:, best].to(torch.float64))
        if c % 1000 == 0:
            log.debug("k-means++: %d/%d centres", c, k)
    return centers, ids
