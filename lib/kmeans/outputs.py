"""Publishing a k-means step (rank 0 only) and the collectives around it.

A step's arrays (``lib.formats.clusters`` describes them) are published with their
sidecars, then the step's marker (the task's marker contract, ``part: step{s}``) at
``kmeans/level{L}/<step>/completions/task_00000.json``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from lib.compute.comm import Comm
from lib.core.errors import InvalidMarkerError
from lib.core.markers import CompletionMarker, discard_marker, require_intact, write_marker
from lib.core.paths import MERGE_DIR, RunPaths
from lib.formats.arrays import publish_npy


def build_members(
    assignment: np.ndarray, sq_distances: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """CSR of clusters: (offsets (k+1,), members (N,)), each cluster nearest first."""
    order = np.lexsort((sq_distances, assignment))  # stable: equal distances by index
    counts = np.bincount(assignment, minlength=k)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return offsets, order.astype(np.int64)


def centroid_dtype(data: np.ndarray) -> np.dtype:
    return np.dtype("float64") if data.dtype == np.float64 else np.dtype("float32")


def publish_step(
    paths: RunPaths,
    stage: str,
    level: int,
    step: str,
    config_hash: str,
    centroids: np.ndarray,
    assignment: np.ndarray,
    sq_distances: np.ndarray,
    *,
    out_dtype: np.dtype,
    save_distances: bool,
    sample: np.ndarray | None,
    extra: dict,
    started: float,
) -> None:
    """Write a step's arrays, then its marker (rank 0 only)."""
    storage = paths.storage
    files = paths.kmeans_step(level, step)
    name = paths.marker(files.dir, 0)
    discard_marker(storage, name)  # a stale one goes before the arrays it describes
    storage.remove_stale_temporaries(files.dir)
    k = len(centroids)
    offsets, members = build_members(assignment, sq_distances, k)
    arrays = {
        "centroids": centroids.astype(out_dtype),
        "assignment": assignment.astype(np.int64),
        "members_offsets": offsets,
        "members": members,
    }
    if save_distances:
        arrays["distances"] = sq_distances.astype(np.float32)
    if sample is not None:
        arrays["sample"] = sample
    outputs = [o for name, a in arrays.items() for o in publish_npy(storage, files.array(name), a)]
    sizes = np.diff(offsets)
    marker = CompletionMarker(
        stage=stage,
        task=0,
        num_tasks=1,
        config_hash=config_hash,
        row_range=[0, len(assignment)],
        counts={
            "points": len(assignment),
            "clusters": k,
            "empty_clusters": int((sizes == 0).sum()),
            "sample_points": 0 if sample is None else len(sample),
        },
        outputs=outputs,
        extra=extra,
        part=step,
        wall_seconds=time.time() - started,
    )
    write_marker(storage, name, marker)


def prepare_level(paths: RunPaths, level: int, merged: str | None, comm: Comm) -> None:
    """Before a level runs: rank 0 removes the temporaries of killed attempts in the level's
    dir (one job per level: they are its own) and checks (sha256) what the level reads
    against its marker: the merged embeddings ``merged`` (a name in the run dir; None for
    ``kmeans.embeddings_path``) for level 1, level L-1 for level L. A file that no longer
    matches invalidates that marker; every rank then raises ``InvalidMarkerError``."""

    def check() -> None:
        paths.storage.clean_temporaries(f"{paths.kmeans_level(level)}/")
        if level > 1:
            require_intact(paths.storage, paths.marker(paths.kmeans_level(level - 1), 0))
        elif merged is not None:
            require_intact(paths.storage, paths.marker(MERGE_DIR, 0), only=[merged])

    comm.check_on_root(check, InvalidMarkerError)


def gather_to_root(comm: Comm, local: np.ndarray) -> np.ndarray | None:
    out = comm.gather_rows(torch.from_numpy(np.ascontiguousarray(local)))
    return None if out is None else out.numpy()


def all_done(comm: Comm, done: bool) -> bool:
    """True only if every rank found the step complete (they all read the same files)."""
    flag = comm.max_(torch.tensor([0 if done else 1], dtype=torch.int64))
    return int(flag.item()) == 0
