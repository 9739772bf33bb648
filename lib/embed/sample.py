"""The embed stage's sample file (``embed/sample.parquet``): written at launch from
``lib.data.sampling``, read by every task to map its row positions to dataset rows."""

from __future__ import annotations

import numpy as np

from lib.core.errors import DatasetError
from lib.core.paths import RunPaths
from lib.core.storage import OutputFile, Storage
from lib.data.sampling import Sample
from lib.formats.parquet import publish_table, read_table


def write_sample(paths: RunPaths, sample: Sample) -> OutputFile:
    return publish_table(paths.storage, paths.embed_sample(), sample.table())


def read_sample(storage: Storage, paths: RunPaths, rows: int) -> np.ndarray:
    """The sample's dataset rows. Raises ``DatasetError`` when the file is missing or does
    not hold the ``rows`` rows the plan has."""
    name = paths.embed_sample()
    try:
        index = read_table(storage, name, ["row_index"]).column(0).to_numpy()
    except FileNotFoundError:
        raise DatasetError(
            f"{paths.url(name)} is missing: this run embeds a sample (dataset.per_source/"
            "dataset.sources), written at launch; relaunch the same command to write it again"
        ) from None
    if len(index) != rows:
        raise DatasetError(
            f"{paths.url(name)} lists {len(index)} rows, the plan {rows}: the sample was "
            "changed after launch; relaunch the same command"
        )
    return index.astype(np.int64)
