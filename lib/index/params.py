"""The ``index`` node: which faiss index the index stage builds, and how it is searched."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from lib.config.fields import bounded, unhashed


class IndexKind(StrEnum):
    auto = "auto"  # flat below ``flat_max_rows`` vectors, else ivf_flat
    flat = "flat"  # exact
    ivf_flat = "ivf_flat"  # inverted lists of full vectors
    ivf_pq = "ivf_pq"  # inverted lists of product-quantized codes (pq_m bytes a vector)
    hnsw = "hnsw"  # HNSW graph over full vectors


class IndexMetric(StrEnum):
    auto = "auto"  # inner product when the merge found unit-norm rows, else L2
    ip = "ip"
    l2 = "l2"


@dataclass
class IndexParams:
    """What the index stage builds. ``null`` settings are chosen from the data
    (``lib.index.choice``): ``nlist`` ~ 4 sqrt(N), ``train_size`` 40 vectors per list,
    ``nprobe`` nlist/16 (at least 16), ``pq_m`` dim/8. ``nprobe`` and ``ef_search`` are saved
    with the index (``index/params.json``); ``launch.py search --nprobe/--ef-search`` may
    override them per query."""

    kind: IndexKind = IndexKind.auto
    metric: IndexMetric = IndexMetric.auto
    flat_max_rows: int = bounded(100_000, ge=1)  # kind=auto: flat below this many vectors
    nlist: int | None = bounded(None, ge=1)  # IVF lists; null: ~4 sqrt(N)
    train_size: int | None = bounded(None, ge=1)  # IVF/PQ training sample; null: 40 x nlist
    nprobe: int | None = bounded(None, ge=1)  # IVF lists searched; null: nlist/16, >= 16
    hnsw_m: int = bounded(32, ge=2)  # HNSW links per node
    ef_construction: int = bounded(40, ge=1)
    ef_search: int = bounded(128, ge=1)  # 64 gave recall@10 0.90 on 200k x 384 (BENCHMARKS.md)
    pq_m: int | None = bounded(None, ge=1)  # sub-quantizers (must divide dim); null: dim/8
    pq_nbits: int = bounded(8, ge=1, le=16)
    seed: int = bounded(0, ge=0)  # the training sample and faiss's k-means
    # Rows read and added at once: memory is the index plus one chunk.
    chunk_rows: int = unhashed(65536, ge=1)
    threads: int | None = unhashed(None, ge=1)  # faiss OpenMP threads; null: faiss's default
