"""Pilot sampling: which dataset rows a run embeds when it does not embed them all.

``dataset.per_source=N`` keeps N rows of every source (all of a smaller source),
``dataset.sources=[...]`` only the named sources. ``sampling=first`` takes each source's
first rows in dataset order; ``sampling=random`` draws without replacement with a
generator seeded by ``dataset.seed`` and the source's name, so the draw is the same on
every machine and for any number of tasks (it is made once, at launch). Either way the
selected rows stay in dataset order and keep their dataset index (contract 6): the run's
row positions ``0..M`` map to dataset rows through the sample, recorded in
``embed/sample.parquet`` (``row_index``, ``source``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig

from lib.core.errors import ConfigError, DatasetError
from lib.data.datasets import RowSource
from lib.data.params import Sampling

SAMPLE_SCHEMA = pa.schema([("row_index", pa.int64()), ("source", pa.string())])


@dataclass(frozen=True)
class Sample:
    """The selected dataset rows (sorted) and each one's source."""

    row_index: np.ndarray
    sources: list[str]

    def table(self) -> pa.Table:
        return pa.table(
            {"row_index": pa.array(self.row_index, pa.int64()), "source": self.sources},
            schema=SAMPLE_SCHEMA,
        )

    def summary(self) -> dict:
        """For ``plan.json``: rows per source and a digest of the selected indices."""
        counts: dict[str, int] = {}
        for s in self.sources:
            counts[s] = counts.get(s, 0) + 1
        digest = hashlib.sha256(np.ascontiguousarray(self.row_index, "<i8").tobytes())
        return {
            "rows": len(self.row_index),
            "per_source": dict(sorted(counts.items())),
            "row_index_sha256": digest.hexdigest(),
        }


def wants_sample(cfg: DictConfig) -> bool:
    d = cfg.dataset
    return d.per_source is not None or bool(d.sources)


def _seed_for(seed: int, source: str) -> np.random.Generator:
    # Per source, so a source's draw does not depend on which other sources exist.
    key = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, key])


def select_rows(
    sources: list[str], per_source: int | None, sampling: Sampling, seed: int, keep: list[str]
) -> Sample:
    """The sample of a dataset whose row i has source ``sources[i]``. Raises
    ``DatasetError`` naming a source in ``keep`` that the dataset does not have."""
    arr = np.asarray(sources, dtype=object)
    names, inverse = np.unique(arr, return_inverse=True) if len(arr) else ([], np.array([]))
    names = [str(n) for n in names]
    if keep:
        missing = [s for s in keep if s not in names]
        if missing:
            raise DatasetError(
                f"dataset.sources names {', '.join(map(repr, missing))}, not a source of the "
                f"dataset; its sources: {', '.join(names)}"
            )
    picked: list[np.ndarray] = []
    for code, name in enumerate(names):
        if keep and name not in keep:
            continue
        rows = np.flatnonzero(inverse == code)
        if per_source is not None and len(rows) > per_source:
            if Sampling(sampling) == Sampling.first:
                rows = rows[:per_source]
            else:
                rows = np.sort(_seed_for(seed, name).choice(rows, per_source, replace=False))
        picked.append(rows)
    index = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
    return Sample(index.astype(np.int64), [str(arr[i]) for i in index])


def dataset_sample(source: RowSource, cfg: DictConfig, rows: int) -> Sample:
    """The sample of the first ``rows`` rows of ``source`` (``dataset.limit`` applied)
    that ``cfg.dataset`` asks for. Raises ``DatasetError`` when nothing is selected."""
    from lib.data.columns import id_source_fields

    d = cfg.dataset
    _, source_field = id_source_fields(cfg, source.columns)
    if source_field is None:
        names = [str(d.name)] * rows  # one source: the dataset
    else:
        col = source.read(0, rows, [source_field]).column(0)
        names = [str(d.name) if v is None else str(v) for v in col.to_pylist()]
    sample = select_rows(
        names,
        None if d.per_source is None else int(d.per_source),
        Sampling(d.sampling),
        int(d.seed),
        [str(s) for s in d.sources],
    )
    if not len(sample.row_index):
        raise DatasetError(f"{source.description}: the sample selects no rows")
    return sample


def check_sample_config(cfg: DictConfig) -> None:
    if wants_sample(cfg) and bool(cfg.embed.get("append", False)):
        raise ConfigError(
            "embed.append=true cannot be combined with dataset.per_source/dataset.sources: a "
            "sample is drawn over the whole dataset, so a grown dataset draws another one. "
            "Launch the sample under its own run.name."
        )
