"""The ``kmeans`` node: the hierarchy, the solver and where a level job runs.

One dataclass is the Hydra node, the level jobs' input and the solver's input (``kmeans()``
takes it with the number of clusters of the problem at hand). Per-level settings are lists
with one entry per level; ``n_resampling_steps``, ``sample_size`` and ``n_splits`` may have
one entry, used for every level. ``validate`` checks everything at launch, before anything
runs. Fields declared ``unhashed`` change speed or placement, never results.

Precision: ``compute_dtype`` (float32 default) is the dtype of the distance products;
``dtype`` (float64 default) that of the per-cluster sums of the M-step and the inertia;
``allow_tf32`` (CUDA only) lets cuBLAS use TF32 for float32 products (~1e-3 relative error
in distances); ``bounds`` (default: on for CPU, off for CUDA) enables Hamerly's bounds,
which skip points whose assignment provably did not change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from lib.compute.devices import Device
from lib.config.fields import bounded, from_mapping, hashed_values, unhashed
from lib.core.errors import ConfigError

SAMPLING_STRATEGIES = ("r", "c")
INITS = ("kmeans++", "random")
PER_LEVEL = ("n_clusters", "n_resampling_steps", "sample_size", "n_splits")
BROADCAST = ("n_resampling_steps", "sample_size", "n_splits")  # one entry: every level
DEFAULT_CHUNK_ROWS = 65536


class KmeansBackend(StrEnum):
    torch = "torch"  # our k-means, distributed over ranks (gloo on CPU, NCCL on GPU)
    faiss = "faiss"  # faiss-cpu Lloyd iterations, one process only (world_size=1)


@dataclass
class KmeansParams:
    # null: len(n_clusters).
    n_levels: int | None = unhashed(None, ge=1)
    n_clusters: list[int] = bounded(ge=1, default_factory=lambda: [1000, 100])
    # Steps per level, step 0 included: 1 = plain k-means, 3 = two resampling steps.
    n_resampling_steps: list[int] = bounded(ge=1, default_factory=lambda: [1])
    sample_size: list[int] = bounded(ge=1, default_factory=lambda: [10])  # points per cluster
    n_splits: list[int] = bounded(ge=1, default_factory=lambda: [1])  # >1: level-1 split mode
    n_iters: int = bounded(50, ge=0)  # Lloyd iterations per k-means
    tol: float = bounded(0.0, ge=0)  # stop earlier when the relative inertia change is below tol
    init: str = "kmeans++"  # kmeans++ | random (| faiss with backend=faiss)
    # K-means++ candidates per centre; null: 2 + ln k.
    n_local_trials: int | None = bounded(None, ge=1)
    sampling_strategy: str = "r"  # r: random, c: closest to the centroid
    dtype: str = "float64"  # accumulation dtype of the Lloyd sums
    compute_dtype: str = "float32"  # dtype of the distance products
    seed: int = bounded(0, ge=0)
    chunk_rows: int = unhashed(DEFAULT_CHUNK_ROWS, ge=1)
    # The most a rank may hold of its shard converted to the compute dtype (null: 2 GiB
    # on CPU, half the free memory on CUDA; 0 streams every pass from the memmap).
    cache_bytes: int | None = unhashed(None, ge=0)
    backend: KmeansBackend = KmeansBackend.torch
    allow_tf32: bool = False
    bounds: bool | None = None  # null: triangle-inequality bounds on CPU only
    save_distances: bool = unhashed(True)
    # Not part of the algorithm: where and how the level jobs run.
    world_size: int = unhashed(1, ge=1)  # ranks per level job (local processes or SLURM tasks)
    device: Device = unhashed(Device.auto)
    # null: the merge stage's embeddings; else a .npy/.safetensors matrix to cluster. Its
    # identity (path, shape, dtype) enters level 1's hash as the level's input.
    embeddings_path: str | None = unhashed(None)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> KmeansParams:
        """Build and validate from a plain mapping; ``ConfigError`` names unknown keys."""
        values = dict(mapping)
        for key in PER_LEVEL:
            if key in values:
                values[key] = [int(v) for v in values[key]]
        params = from_mapping(cls, values, "kmeans")
        params.validate()
        return params

    def levels(self) -> int:
        return int(self.n_levels) if self.n_levels is not None else len(self.n_clusters)

    def per_level(self, key: str, level: int) -> int:
        """The value of a per-level list for ``level`` (1-based)."""
        values = list(getattr(self, key))
        return int(values[0] if len(values) == 1 and key in BROADCAST else values[level - 1])

    def validate(self) -> None:
        """Raise ``ConfigError`` with the offending key and a fix."""
        n = self.levels()
        if n < 1:
            raise ConfigError(f"kmeans.n_levels must be >= 1, got {n}")
        for name in PER_LEVEL:
            values = list(getattr(self, name))
            if len(values) != n and not (name in BROADCAST and len(values) == 1):
                raise ConfigError(
                    f"kmeans.{name} has {len(values)} entries {values} but n_levels={n}: give "
                    "one value per level"
                )
            for i in range(n):
                v = self.per_level(name, i + 1)
                if v < 1:
                    what = "a sample_size of 0 draws nothing" if name == "sample_size" else ""
                    raise ConfigError(
                        f"kmeans.{name}[{i}] (level {i + 1}) must be >= 1, got {v}"
                        + (f" ({what})" if what else "")
                    )
        for level in range(1, n + 1):
            splits, steps = (
                self.per_level("n_splits", level),
                self.per_level("n_resampling_steps", level),
            )
            if splits > 1 and steps > 1:
                raise ConfigError(
                    f"level {level}: n_splits={splits} (split mode) cannot be combined with "
                    f"n_resampling_steps={steps}; set one of them to 1"
                )
        for level in range(2, n + 1):
            most = self.per_level("n_clusters", level - 1) * self.per_level("n_splits", level - 1)
            if self.per_level("n_clusters", level) > most:
                raise ConfigError(
                    f"level {level}: n_clusters={self.per_level('n_clusters', level)} exceeds "
                    f"the at most {most} clusters of level {level - 1} it clusters; lower it"
                )
        if self.sampling_strategy not in SAMPLING_STRATEGIES:
            raise ConfigError(
                f"kmeans.sampling_strategy must be 'r' (random) or 'c' (closest), "
                f"got {self.sampling_strategy!r}"
            )
        self.validate_solver(self.per_level("n_clusters", 1))

    def validate_solver(self, n_clusters: int) -> None:
        """Raise ``ConfigError`` naming the bad solver setting and its allowed values."""
        if n_clusters < 1:
            raise ConfigError(f"kmeans n_clusters must be >= 1, got {n_clusters}")
        if self.n_iters < 0:
            raise ConfigError(f"kmeans n_iters must be >= 0, got {self.n_iters}")
        if self.tol < 0:
            raise ConfigError(f"kmeans tol must be >= 0, got {self.tol}")
        backends = tuple(b.value for b in KmeansBackend)
        if str(self.backend) not in backends:
            raise ConfigError(f"kmeans backend must be one of {backends}, got {self.backend!r}")
        allowed = (*INITS, "faiss") if self.backend == KmeansBackend.faiss else INITS
        if self.init not in allowed:
            raise ConfigError(f"kmeans init must be one of {allowed}, got {self.init!r}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(
                f"kmeans dtype (accumulation) must be float32 or float64, got {self.dtype!r}"
            )
        if self.compute_dtype not in ("float32", "float64"):
            raise ConfigError(
                f"kmeans compute_dtype must be float32 or float64, got {self.compute_dtype!r}"
            )
        if self.chunk_rows < 1:
            raise ConfigError(f"kmeans chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.n_local_trials is not None and self.n_local_trials < 1:
            raise ConfigError(f"kmeans n_local_trials must be >= 1, got {self.n_local_trials}")

    def level_values(self, level: int) -> dict[str, Any]:
        """The settings that determine ``level``'s result (its part of the config hash)."""
        values = hashed_values(KmeansParams, self)
        for key in PER_LEVEL:
            values[key] = self.per_level(key, level)
        return {**values, "level": level}
