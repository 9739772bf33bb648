"""What every metric shares: checked labels, row blocks of a rank and distance products."""

from __future__ import annotations

import numpy as np
import torch

from lib.compute.tensors import as_tensor
from lib.core.errors import EmbedfleetError


class ClusterMetricsError(EmbedfleetError, ValueError):
    """The labelling does not allow a metric (one cluster, wrong length, bad labels)."""


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


def blocks(start: int, stop: int, size: int):
    for b0 in range(start, stop, size):
        yield b0, min(b0 + size, stop)


def rows(X: np.ndarray, b0: int, b1: int, dtype: torch.dtype) -> torch.Tensor:
    # as_tensor: a read-only memmap slice is viewed, not copied, and only read.
    return as_tensor(X[b0:b1]).to(dtype)


def pairwise_euclidean(
    a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor
) -> torch.Tensor:
    """Euclidean distances ``|a_i - b_j|`` by the expanded product (clamped at 0)."""
    d2 = torch.addmm(b_sq.unsqueeze(0), a, b.T, alpha=-2.0).add_(a_sq.unsqueeze(1))
    return d2.clamp_(min=0.0).sqrt_()
