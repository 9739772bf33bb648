"""Reading a k-means hierarchy from a run dir (written by ``lib.kmeans``, read by the curate
and metrics stages).

Per level ``L`` and step (``step{s}`` or ``split``), arrays with sidecars::

    centroids.npy (k, D)   assignment.npy (N_L,)   members_offsets.npy (k+1,)
    members.npy (N_L,)     distances.npy (N_L,)    sample.npy (m,)

Cluster ``c``'s points are ``members[offsets[c]:offsets[c+1]]``, nearest first. A level is
finished when its completion marker (``kmeans/level{L}/completions/task_00000.json``) is
valid; the marker names the final step, and ``final.json`` summarises the level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lib.core.errors import DatasetError, InvalidMarkerError, UpstreamIncompleteError
from lib.core.markers import CompletionMarker, read_marker
from lib.core.paths import RunPaths, StepFiles
from lib.core.storage import Storage
from lib.formats.arrays import read_npy


@dataclass
class StepOutputs:
    """Read access to one step's published arrays (memory-mapped, sidecar-checked)."""

    storage: Storage
    files: StepFiles

    @classmethod
    def at(cls, paths: RunPaths, level: int, step: str) -> StepOutputs:
        return cls(paths.storage, paths.kmeans_step(level, step))

    @property
    def dir(self) -> str:
        return self.files.dir

    def load(self, name: str, shape: tuple[int | None, ...] | None = None, dtype=None):
        return read_npy(self.storage, self.files.array(name), shape=shape, dtype=dtype)

    def centroids(self) -> np.ndarray:
        return self.load("centroids", shape=(None, None))

    def assignment(self) -> np.ndarray:
        return self.load("assignment", shape=(None,), dtype="int64")

    def members(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets (k+1,), members (N,)): cluster c is members[offsets[c]:offsets[c+1]]."""
        offsets = self.load("members_offsets", shape=(None,), dtype="int64")
        members = self.load("members", shape=(None,), dtype="int64")
        if int(offsets[-1]) != len(members):
            raise DatasetError(
                f"{self.storage.url(self.dir)}: members_offsets ends at {int(offsets[-1])} but "
                f"members has {len(members)} entries; rerun the level"
            )
        return np.asarray(offsets), members

    def distances(self) -> np.ndarray:
        return self.load("distances", shape=(None,))


def level_marker(paths: RunPaths, level: int) -> CompletionMarker | None:
    """The level's completion marker if the level finished, else None. A reader trusts
    the marker's presence: damaged arrays fail their own checks (sidecar, lengths) with
    a message naming the file, when they are read."""
    try:
        return read_marker(paths.storage, paths.marker(paths.kmeans_level(level), 0))
    except (FileNotFoundError, InvalidMarkerError):
        return None


def load_level(paths: RunPaths, level: int) -> tuple[dict, StepOutputs]:
    """``final.json`` of a finished level and its final step's outputs.

    Raises ``UpstreamIncompleteError`` when the level has not finished.
    """
    marker: CompletionMarker | None = level_marker(paths, level)
    final = paths.storage.read_json(paths.kmeans_final(level)) if marker else None
    if marker is None or final is None:
        raise UpstreamIncompleteError(
            f"k-means level {level} has not finished: "
            f"{paths.url(paths.marker(paths.kmeans_level(level), 0))} is missing; run level "
            f"{level} first"
        )
    return final, StepOutputs.at(paths, level, str(marker.extra["final_step"]))


def find_levels(paths: RunPaths) -> list[int]:
    """Levels under ``kmeans/`` whose completion marker exists (sorted)."""
    found = (paths.kmeans_level_of_marker(n) for n in paths.storage.list(paths.kmeans))
    return sorted({level for level in found if level is not None})
