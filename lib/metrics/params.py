"""The ``metrics``, ``tracking`` and ``clustering`` nodes.

``MetricsParams`` is the Hydra node and ``compute_metrics``' input. ``compute_dtype`` is
the dtype of the pairwise distance products: float32 (the default: what every pipeline
and standalone run used) agrees with scikit-learn to ~1e-7 relative on these metrics,
float64 to ~1e-12. Fields declared ``unhashed`` change speed, placement or what is shown,
never the metric values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from lib.config.fields import bounded, unhashed
from lib.core.errors import ConfigError

COMPUTE_DTYPES = ("float32", "float64")


@dataclass
class MetricsParams:
    levels: list[int] | None = unhashed(None, ge=1)  # null: every finished level
    # The exact silhouette up to this many points, a sampled estimate beyond (sample_size
    # points drawn with seed); 0 disables the silhouette.
    silhouette_exact_max: int = bounded(20000, ge=0)
    sample_size: int = bounded(10000, ge=2)
    # Rows per block: memory ~ block_rows^2 * 8 bytes for the silhouette,
    # block_rows * (D + k) * 8 otherwise.
    block_rows: int = unhashed(2048, ge=1)
    seed: int = bounded(0, ge=0)
    compute_dtype: str = "float32"  # pairwise products: float32 | float64
    simplified_silhouette: bool = True  # point -> own vs nearest other centroid
    resident_bytes: int = unhashed(536870912, ge=0)  # silhouette points held in memory up to this
    # N x k sums: symmetric blocks if they fit.
    silhouette_acc_bytes: int = unhashed(268435456, ge=0)
    n_examples: int = bounded(3, ge=0)  # rows shown per best/worst cluster
    n_show: int = bounded(3, ge=0)  # best/worst clusters shown per ranking
    world_size: int = unhashed(1, ge=1)  # ranks of the pipeline stage
    torch_threads: int | None = unhashed(None, ge=1)  # null: torch's default
    scratch_dir: str | None = unhashed(None)  # null: cluster.scratch_dir
    output_dir: str | None = unhashed(None)  # standalone runs; null: <clustering run_dir>/metrics
    sanity_check: bool = unhashed(False)
    sanity_sample: int = unhashed(2000, ge=1)  # rows of the sanity check's random sample
    sanity_rtol: float = unhashed(1e-6, ge=0)

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the bad setting."""
        if self.block_rows < 1:
            raise ConfigError(f"metrics.block_rows must be >= 1, got {self.block_rows}")
        if self.sample_size < 2:
            raise ConfigError(f"metrics.sample_size must be >= 2, got {self.sample_size}")
        if self.silhouette_exact_max < 0:
            raise ConfigError(
                f"metrics.silhouette_exact_max must be >= 0, got {self.silhouette_exact_max}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"metrics.compute_dtype must be one of {list(COMPUTE_DTYPES)}, "
                f"got {self.compute_dtype!r}"
            )


class TrackingBackend(StrEnum):
    none = "none"
    wandb = "wandb"


class TrackingMode(StrEnum):
    auto = "auto"  # online when an API key is found (env or api_key_file), else offline
    online = "online"
    offline = "offline"


@dataclass
class TrackingParams:
    """Experiment tracking (conf/tracking/{none,wandb}.yaml). The API key is read from
    WANDB_API_KEY or from ``api_key_file`` at run time and never written anywhere."""

    backend: TrackingBackend = TrackingBackend.none
    project: str = "embedfleet"
    entity: str | None = None
    mode: TrackingMode = TrackingMode.auto
    api_key_file: str | None = None
    dir: str | None = None  # null: <metrics output dir>/wandb
    run_name: str | None = None  # null: <clustering name>-metrics
    tags: list[str] = field(default_factory=list)


@dataclass
class ClusteringParams:
    """A clustering to measure (conf/clustering/*.yaml): a run dir with kmeans/ output,
    the embeddings it clustered and their metadata (for example texts)."""

    name: str = ""
    run_dir: str = ""
    # null: <run_dir>/merge/embeddings.safetensors (or .npy)
    embeddings: str | None = None
    # null: <run_dir>/merge/metadata.parquet when it exists
    metadata: str | None = None
    text_field: str = "text"
