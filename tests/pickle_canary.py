"""Legacy pickle shards (``cluster{c}_gpu{g}.pkl`` of the seed runs) that carry a canary: a
value whose unpickling creates a file. Whether that file exists afterwards tells whether
anything unpickled them, which an error message alone cannot."""

from __future__ import annotations

import pathlib
import pickle
from pathlib import Path

import numpy as np


class Canary:
    """Unpickles as ``Path(path).touch()``: any load of it leaves the file behind."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def write_legacy_shards(
    legacy_dir: Path, rng: np.random.Generator, canary: Path | None
) -> np.ndarray:
    """Two shards of 12 and 8 rows (4 dims) in ``legacy_dir``, each with ``canary`` (when
    given) beside its arrays; returns the 20 rows they hold, in order."""
    legacy_dir.mkdir(parents=True, exist_ok=True)
    data = rng.normal(size=(20, 4)).astype(np.float32)
    for c, (a, b) in enumerate([(0, 12), (12, 20)]):
        shard = {
            "embeddings": data[a:b],
            "start_index": a,
            "end_index": b - 1,
            "cluster_id": c,
            "gpu_id": 0,
        }
        if canary is not None:
            shard["note"] = Canary(canary)
        with open(legacy_dir / f"cluster{c}_gpu0.pkl", "wb") as fh:
            pickle.dump(shard, fh)
    return data
