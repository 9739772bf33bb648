"""The points a resampling step clusters: up to ``sample_size`` per cluster of the step
before."""

from __future__ import annotations

import numpy as np

from lib.core.errors import ConfigError


def resample_points(
    offsets: np.ndarray,
    members: np.ndarray,
    sample_size: int,
    strategy: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """Up to ``sample_size`` points of every cluster, sorted ascending (int64).

    ``"c"`` takes each cluster's first members (nearest to the centroid); ``"r"`` a
    uniformly random subset drawn from ``rng``.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    sizes = np.diff(offsets)
    take = np.minimum(sizes, sample_size)
    if strategy == "c":
        starts = np.repeat(offsets[:-1], take)
        within = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
        picked = np.asarray(members[starts + within])
    elif strategy == "r":
        cluster = np.repeat(np.arange(len(sizes)), sizes)
        order = np.lexsort((rng.random(len(cluster)), cluster))  # shuffled within clusters
        rank_in_cluster = np.arange(len(cluster)) - np.repeat(offsets[:-1], sizes)
        picked = np.asarray(members[order[rank_in_cluster < take[cluster]]])
    else:
        raise ConfigError(f"sampling_strategy must be 'r' or 'c', got {strategy!r}")
    return np.sort(picked).astype(np.int64)
