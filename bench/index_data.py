"""Synthetic embeddings for the index tests and benchmark: clustered unit vectors.

Real sentence embeddings are not uniform on the sphere (uniform random vectors in 384
dimensions have no near neighbours at all, and no index beats a scan on them): they
gather around topics. ``clustered_unit_vectors`` draws ``n`` rows around ``n / 200``
random unit centres (a row is its centre plus isotropic noise of norm ~``spread``,
renormalized), in blocks, from a generator seeded with ``seed``.
"""

from __future__ import annotations

import numpy as np

ROWS_PER_CENTRE = 200


def clustered_unit_vectors(
    n: int, dim: int, seed: int = 0, spread: float = 1.0, out: np.ndarray | None = None
) -> np.ndarray:
    """``(n, dim)`` float32 unit rows (into ``out``, e.g. a memmap, when given)."""
    rng = np.random.default_rng(seed)
    k = max(1, n // ROWS_PER_CENTRE)
    centres = rng.standard_normal((k, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32) if out is None else out
    for a in range(0, n, 65536):
        b = min(n, a + 65536)
        x = centres[rng.integers(0, k, b - a)]
        x += (spread / np.sqrt(dim)) * rng.standard_normal((b - a, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[a:b] = x
    return out


def queries_near(data: np.ndarray, n: int, seed: int = 1, noise: float = 0.5) -> np.ndarray:
    """``n`` unit queries: random rows of ``data`` moved by noise of norm ~``noise`` (a
    query is near the data, but not a stored row)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(data), size=n, replace=False))
    q = np.asarray(data[rows], dtype=np.float32).copy()
    q += (noise / np.sqrt(data.shape[1])) * rng.standard_normal(q.shape, dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of ``truth`` (exact ids) present in the same row of
    ``found``."""
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))
