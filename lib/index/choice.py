"""Settings of an index chosen from the data: its kind, nlist, training sample, metric and
search settings. Pure functions of the row count, dimension and the merge's norms, so a
plan, a build and a test agree on them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lib.core.errors import ConfigError
from lib.index.params import IndexKind, IndexMetric, IndexParams

# Rows whose L2 norm is within this of 1 count as unit vectors (float32 rounding of a
# normalized row is ~1e-7; float16 storage ~1e-3).
UNIT_NORM_TOLERANCE = 2e-3
# faiss's k-means warns below 39 training points per centroid.
TRAIN_PER_LIST = 40
MIN_NPROBE = 16


@dataclass(frozen=True)
class IndexLayout:
    """What one build makes: ``kind`` (never auto), ``metric`` (ip | l2), and the
    settings that kind uses (0 where it has none)."""

    kind: str
    metric: str
    rows: int
    dim: int
    nlist: int = 0
    train_size: int = 0
    nprobe: int = 0
    hnsw_m: int = 0
    ef_construction: int = 0
    ef_search: int = 0
    pq_m: int = 0
    pq_nbits: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def is_ivf(self) -> bool:
        return self.kind in (IndexKind.ivf_flat, IndexKind.ivf_pq)


def choose_kind(kind: IndexKind | str, rows: int, flat_max_rows: int) -> str:
    """``kind``, or for ``auto``: exact ``flat`` below ``flat_max_rows`` rows, else
    ``ivf_flat``."""
    kind = IndexKind(kind)
    if kind != IndexKind.auto:
        return kind.value
    return IndexKind.flat.value if rows < flat_max_rows else IndexKind.ivf_flat.value


def choose_nlist(nlist: int | None, rows: int) -> int:
    """IVF lists: ``nlist``, else round(4 sqrt(rows)) (at least 1, at most ``rows``).
    Raises ``ConfigError`` when a given ``nlist`` exceeds the rows (faiss could not train)."""
    if nlist is not None:
        if nlist > rows:
            raise ConfigError(
                f"index.nlist={nlist} is more than the {rows} vectors to index: each list "
                f"needs a trained centroid; set index.nlist <= {rows} (or null: ~4 sqrt(N))"
            )
        return int(nlist)
    return max(1, min(rows, round(4 * math.sqrt(rows))))


def choose_train_size(train_size: int | None, nlist: int, rows: int) -> int:
    """Vectors the IVF quantizer trains on: ``train_size`` (at most ``rows``), else 64 per
    list. Raises ``ConfigError`` when fewer than ``nlist``."""
    size = min(rows, int(train_size) if train_size is not None else TRAIN_PER_LIST * nlist)
    if size < nlist:
        raise ConfigError(
            f"index.train_size={train_size} is below index.nlist={nlist}: k-means needs at "
            f"least one training vector per list; raise index.train_size (null: "
            f"{TRAIN_PER_LIST} x nlist)"
        )
    return size


def choose_nprobe(nprobe: int | None, nlist: int) -> int:
    """Lists searched per query: ``nprobe`` (at most ``nlist``), else nlist/16, at least 16."""
    if nprobe is not None:
        return min(int(nprobe), nlist)
    return min(nlist, max(MIN_NPROBE, nlist // 16))


def choose_pq_m(pq_m: int | None, dim: int) -> int:
    """Sub-quantizers of IVF-PQ: ``pq_m``, else dim/8 (the largest divisor of ``dim`` not
    above it). Raises ``ConfigError`` when ``pq_m`` does not divide ``dim``."""
    if pq_m is not None:
        if dim % pq_m:
            divisors = [m for m in range(1, dim + 1) if dim % m == 0]
            raise ConfigError(
                f"index.pq_m={pq_m} does not divide the embedding dimension {dim}; use one "
                f"of {divisors}"
            )
        return int(pq_m)
    return next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0)


def choose_metric(metric: IndexMetric | str, report: dict[str, Any] | None, where: str) -> str:
    """``ip`` or ``l2``: ``metric``, else for ``auto`` inner product when every merged row
    has unit L2 norm (the merge quality report's ``l2_norm`` min and max), L2 otherwise.
    Raises ``ConfigError`` when ``auto`` has no report to read (``where`` names it)."""
    metric = IndexMetric(metric)
    if metric != IndexMetric.auto:
        return metric.value
    norms = (report or {}).get("l2_norm")
    if not norms or norms.get("min") is None:
        raise ConfigError(
            f"index.metric=auto reads the L2 norms of the merged rows from {where}, which "
            "has none; rerun the merge stage, or set index.metric=ip|l2"
        )
    unit = (
        abs(float(norms["min"]) - 1.0) <= UNIT_NORM_TOLERANCE
        and abs(float(norms["max"]) - 1.0) <= UNIT_NORM_TOLERANCE
    )
    return IndexMetric.ip.value if unit else IndexMetric.l2.value


def choose_layout(params: IndexParams, rows: int, dim: int, metric: str) -> IndexLayout:
    """Every setting of the index to build for ``rows`` x ``dim`` vectors. Raises
    ``ConfigError`` for settings that cannot work on these rows (nothing to index, nlist
    or pq_m that do not fit)."""
    if rows < 1:
        raise ConfigError(
            "the merged embeddings have no rows: nothing to index (every row was dropped? see "
            "merge/dropped_rows.parquet)"
        )
    kind = choose_kind(params.kind, rows, params.flat_max_rows)
    base = {"kind": kind, "metric": metric, "rows": rows, "dim": dim}
    if kind == IndexKind.flat:
        return IndexLayout(**base)
    if kind == IndexKind.hnsw:
        return IndexLayout(
            **base,
            hnsw_m=int(params.hnsw_m),
            ef_construction=int(params.ef_construction),
            ef_search=int(params.ef_search),
        )
    nlist = choose_nlist(params.nlist, rows)
    ivf = {
        "nlist": nlist,
        "train_size": choose_train_size(params.train_size, nlist, rows),
        "nprobe": choose_nprobe(params.nprobe, nlist),
    }
    if kind == IndexKind.ivf_pq:
        m = choose_pq_m(params.pq_m, dim)
        nbits = int(params.pq_nbits)
        if ivf["train_size"] < 2**nbits:
            raise ConfigError(
                f"index.pq_nbits={nbits} needs at least {2**nbits} training vectors, "
                f"have {ivf['train_size']}; lower index.pq_nbits or use index.kind=ivf_flat"
            )
        return IndexLayout(**base, **ivf, pq_m=m, pq_nbits=nbits)
    return IndexLayout(**base, **ivf)
