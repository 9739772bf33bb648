"""The ``curate`` node: what the balanced hierarchical sampling draws."""

from __future__ import annotations

from dataclasses import dataclass

from lib.config.fields import bounded
from lib.core.errors import ConfigError


@dataclass
class CurateParams:
    """``target_size`` points, cluster capacities times ``multiplier`` (>1 repeats small
    clusters), ``strategy`` inside level-1 clusters: ``r`` random or ``c`` closest to the
    centroid; every draw from one generator seeded with ``seed``."""

    target_size: int = bounded(1000, ge=0)
    multiplier: int = bounded(1, ge=1)
    strategy: str = "r"
    seed: int = bounded(0, ge=0)
    # null: the merge stage's metadata.parquet (or none when kmeans.embeddings_path is set)
    metadata_path: str | None = None

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the bad setting."""
        if self.target_size < 0:
            raise ConfigError(f"curate.target_size must be >= 0, got {self.target_size}")
        if self.multiplier < 1:
            raise ConfigError(f"curate.multiplier must be >= 1, got {self.multiplier}")
        if self.strategy not in ("r", "c"):
            raise ConfigError(
                f"curate.strategy must be 'r' (random) or 'c' (closest), got {self.strategy!r}"
            )
