"""The ``report`` node: what the report page shows and how much of it.

Every field changes only what the page shows (or how fast it is made), never another
stage's outputs, so none is hashed: ``launch.py report RUN_DIR --max-points N`` may redraw
a finished run's page without invalidating its marker.
"""

from __future__ import annotations

from dataclasses import dataclass

from lib.config.fields import unhashed


@dataclass
class ReportParams:
    # Points on the 2-D maps at most, sampled per source (each source gets an equal share,
    # a small source all of its rows) so small sources stay visible.
    max_points: int = unhashed(50_000, ge=1)
    pca_components: int = unhashed(50, ge=2)  # bars of the scree plot (at most the dim)
    pc_extremes: int = unhashed(3, ge=0)  # principal components whose end texts are listed
    extreme_texts: int = unhashed(5, ge=1)  # texts at each end of such a component
    text_chars: int = unhashed(200, ge=1)  # characters of a row's text on hover and in lists
    # Rows per block of the streamed covariance: memory ~ block_rows x D x 12 bytes.
    block_rows: int = unhashed(8192, ge=1)
    umap: bool = unhashed(False)  # a UMAP map as well (umap-learn, on the sampled points)
    umap_neighbors: int = unhashed(15, ge=2)
    seed: int = unhashed(0, ge=0)  # the per-source sample of the maps
