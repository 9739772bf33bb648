"""Balanced hierarchical sampling of a curated subset from a k-means hierarchy.

The method of Vo et al. 2024 (section "hierarchical sampling"): a ``target_size`` is
shared out from the top level down so that clusters get as equal a share as their sizes
allow, then points are drawn inside level-1 clusters.

- Water-filling: among sibling clusters with capacities ``cap_i`` (number of embeddings
  under cluster i, times ``multiplier``), take the largest integer ``x`` with
  ``sum_i min(x, cap_i) <= target``; every cluster gets ``min(x, cap_i)`` and the
  remainder goes, one each, to clusters chosen at random among those with ``cap_i > x``.
  So two clusters' shares differ by at most 1 unless the smaller one is exhausted.
- The share of a level-L cluster is water-filled over its children (level L-1 clusters)
  down to level 1.
- Inside a level-1 cluster of ``size`` points with share ``t``: the whole cluster is
  repeated ``t // size`` times (only possible with ``multiplier > 1``) and
  ``t % size`` further points are taken at random (``strategy="r"``) or nearest to the
  centroid first (``"c"``, members are stored nearest first).

Without a multiplier no point is taken twice. All draws come from one generator seeded
with ``seed``. Outputs (``write_curated``) under ``<run_dir>/kmeans/curated/``:
``embedding_rows.npy`` (int64, sorted: rows of the embeddings matrix, with repeats),
and given the merge stage's ``metadata.parquet`` (row i describes embeddings row i:
``row_index`` = original dataset row, ``id``, ``source``): ``dataset_rows.npy`` (the
original dataset rows) and ``metadata.parquet`` (those metadata rows plus
``embedding_row``), then a completion marker (stage dir ``kmeans/curated``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lib.core.errors import ConfigError, DatasetError
from lib.core.markers import (
    CompletionMarker,
    discard_marker,
    require_intact,
    valid_marker,
    write_marker,
)
from lib.core.paths import CURATE_STAGE, MERGE_DIR, RunPaths
from lib.core.storage import LocalStorage, Storage
from lib.curate.params import CurateParams
from lib.formats.arrays import publish_npy, read_npy
from lib.formats.clusters import level_marker, load_level
from lib.formats.parquet import publish_table, read_table

METADATA_COLUMNS = ("row_index", "id", "source")


@dataclass
class ClusterTree:
    """Cluster members per level, bottom up: ``levels[0]`` is level 1.

    Each entry is a CSR pair ``(offsets (k_L + 1,), members (N_L,))``: members of a
    level-1 cluster are embedding rows (nearest first), those of a level-L cluster are
    level L-1 cluster ids.
    """

    levels: list[tuple[np.ndarray, np.ndarray]]

    @classmethod
    def from_run(cls, paths: RunPaths, n_levels: int) -> ClusterTree:
        """Read the final step of levels 1..n_levels (``UpstreamIncompleteError`` if one is
        not finished)."""
        levels = []
        for level in range(1, n_levels + 1):
            _, out = load_level(paths, level)
            offsets, members = out.members()
            levels.append((np.asarray(offsets, dtype=np.int64), np.asarray(members)))
        tree = cls(levels)
        tree.check()
        return tree

    def check(self) -> None:
        """Raise ``DatasetError`` if a level's members are not the clusters below it."""
        for i in range(1, len(self.levels)):
            below = len(self.levels[i - 1][0]) - 1
            members = self.levels[i][1]
            if len(members) != below:
                raise DatasetError(
                    f"level {i + 1} has {len(members)} members but level {i} has {below} "
                    "clusters: the levels come from different runs; rerun the upper level"
                )

    def flat_sizes(self) -> list[np.ndarray]:
        """Number of embedding rows under every cluster, per level."""
        sizes = [np.diff(self.levels[0][0])]
        for offsets, members in self.levels[1:]:
            k = len(offsets) - 1
            parent = np.repeat(np.arange(k), np.diff(offsets))
            flat = np.bincount(parent, weights=sizes[-1][members], minlength=k)
            sizes.append(np.rint(flat).astype(np.int64))
        return sizes


def water_fill(
    capacity: np.ndarray,
    group_offsets: np.ndarray,
    targets: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Share ``targets[g]`` among the items of group g as evenly as capacities allow.

    Items of group g are ``capacity[group_offsets[g]:group_offsets[g+1]]``. Returns int64
    counts per item with ``counts <= capacity`` and per-group sums equal to the targets.
    Raises ``ValueError`` if a target exceeds its group's total capacity.
    """
    capacity = np.asarray(capacity, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    sizes = np.diff(group_offsets)
    group = np.repeat(np.arange(len(sizes)), sizes)
    ngroups = len(sizes)
    total = np.bincount(group, weights=capacity, minlength=ngroups)
    if (targets > total).any():
        g = int(np.argmax(targets > total))
        raise ValueError(f"target {int(targets[g])} exceeds capacity {int(total[g])}")
    top = np.zeros(ngroups, dtype=np.int64)
    np.maximum.at(top, group, capacity)
    lo = np.zeros(ngroups, dtype=np.int64)  # sum(min(lo, cap)) <= target always
    hi = top + 1  # sum(min(hi, cap)) > target unless everything fits
    while (hi - lo > 1).any():
        mid = (lo + hi) // 2
        filled = np.bincount(group, weights=np.minimum(mid[group], capacity), minlength=ngroups)
        fits = filled <= targets
        lo = np.where(fits, mid, lo)
        hi = np.where(fits, hi, mid)
    counts = np.minimum(lo[group], capacity)
    left = targets - np.bincount(group, weights=counts, minlength=ngroups).astype(np.int64)
    eligible = np.nonzero(capacity > lo[group])[0]
    if len(eligible) and left.any():
        g = group[eligible]
        order = eligible[np.lexsort((rng.random(len(eligible)), g))]  # shuffled per group
        first = np.searchsorted(group[order], np.arange(ngroups))
        rank = np.arange(len(order)) - first[group[order]]
        counts[order[rank < left[group[order]]]] += 1
    return counts


def allocate(tree: ClusterTree, params: CurateParams, rng: np.random.Generator) -> list[np.ndarray]:
    """Share of the target of every cluster, per level (``[level 1, ..., top]``).

    Raises ``ConfigError`` when the target exceeds the points available (times the
    multiplier).
    """
    params.validate()
    flat = tree.flat_sizes()
    cap = [f * params.multiplier for f in flat]
    available = int(cap[-1].sum())
    if params.target_size > available:
        raise ConfigError(
            f"curate.target_size={params.target_size} exceeds the {int(flat[-1].sum())} points "
            f"in the hierarchy (x multiplier {params.multiplier} = {available}); lower "
            "target_size or raise the multiplier"
        )
    shares = [np.empty(0, dtype=np.int64)] * len(flat)
    top = len(flat) - 1
    shares[top] = water_fill(
        cap[top], np.array([0, len(cap[top])]), np.array([params.target_size]), rng
    )
    for i in range(top, 0, -1):
        offsets, members = tree.levels[i]
        child = np.zeros(len(cap[i - 1]), dtype=np.int64)
        child_in_order = water_fill(cap[i - 1][members], offsets, shares[i], rng)
        child[members] = child_in_order
        shares[i - 1] = child
    return shares


def select_points(
    tree: ClusterTree, level1_shares: np.ndarray, strategy: str, rng: np.random.Generator
) -> np.ndarray:
    """Embedding rows for each level-1 cluster's share, sorted (repeats adjacent)."""
    offsets, members = tree.levels[0]
    sizes = np.diff(offsets)
    cluster = np.repeat(np.arange(len(sizes)), sizes)
    safe = np.maximum(sizes, 1)
    repeats = np.where(sizes > 0, level1_shares // safe, 0)
    rest = np.where(sizes > 0, level1_shares - repeats * sizes, 0)
    if strategy == "c":
        rank = np.arange(len(cluster)) - offsets[:-1][cluster]
        extra = (rank < rest[cluster]).astype(np.int64)
    else:
        order = np.lexsort((rng.random(len(cluster)), cluster))
        rank = np.arange(len(cluster)) - offsets[:-1][cluster]
        extra = np.zeros(len(cluster), dtype=np.int64)
        extra[order[rank < rest[cluster]]] = 1
    per_position = repeats[cluster] + extra
    rows = np.repeat(np.asarray(members, dtype=np.int64), per_position)
    return np.sort(rows, kind="stable")


def hierarchical_sample(tree: ClusterTree, params: CurateParams) -> np.ndarray:
    """Curated embedding rows (int64, sorted, exactly ``target_size`` of them)."""
    rng = np.random.default_rng(params.seed)
    shares = allocate(tree, params, rng)
    rows = select_points(tree, shares[0], params.strategy, rng)
    assert len(rows) == params.target_size, (len(rows), params.target_size)
    return rows


def curated_metadata(
    rows: np.ndarray, metadata: str | Path, storage: Storage | None = None
) -> pa.Table:
    """Metadata of the curated rows, in their order, with an ``embedding_row`` column.

    ``metadata`` is the merge stage's parquet (a name in ``storage``, or a local path)
    whose row i describes embeddings row i (columns include ``row_index`` = original dataset
    row, ``id``, ``source``). Raises ``DatasetError`` if it is missing, lacks those columns
    or has fewer rows than ``rows`` needs.
    """
    if storage is None:
        path = Path(metadata)
        storage, metadata = LocalStorage(path.parent), path.name
    where = storage.url(str(metadata))
    try:
        table = read_table(storage, str(metadata))
    except FileNotFoundError:
        raise DatasetError(
            f"metadata file {where} does not exist; run the merge stage first"
        ) from None
    missing = [c for c in METADATA_COLUMNS if c not in table.column_names]
    if missing:
        raise DatasetError(f"{where}: missing columns {missing} (has {table.column_names})")
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and int(rows.max()) >= table.num_rows:
        raise DatasetError(
            f"{where} has {table.num_rows} rows but the curated set references embeddings row "
            f"{int(rows.max())}: the metadata and the embeddings come from different merges"
        )
    out = table.take(pa.array(rows))
    return out.append_column("embedding_row", pa.array(rows, type=pa.int64()))


def verify_inputs(paths: RunPaths, n_levels: int, metadata: str | Path | None) -> None:
    """Check (sha256) what curate reads against its markers: levels 1..n_levels and the
    merge stage's metadata. A file that no longer matches invalidates its marker and raises
    ``InvalidMarkerError`` saying so; an absent marker is left to the readers' messages."""
    for level in range(1, n_levels + 1):
        require_intact(paths.storage, paths.marker(paths.kmeans_level(level), 0))
    if isinstance(metadata, str):
        require_intact(paths.storage, paths.marker(MERGE_DIR, 0), only=[metadata])


def write_curated(
    run: RunPaths | str | Path,
    n_levels: int,
    params: CurateParams,
    *,
    metadata: str | Path | None = None,
    config_hash: str | None = None,
    stage: str = CURATE_STAGE,
) -> np.ndarray:
    """Sample from the finished hierarchy of ``run`` and publish the curated set.

    Returns the curated embedding rows. Writes the files listed in the module docstring,
    then the marker ``kmeans/curated/completions/task_00000.json``; a valid marker from an
    earlier launch with the same settings means the published rows are returned as they
    are. ``metadata``: the merge stage's ``metadata.parquet`` (a name in the run dir, or a
    local path). ``config_hash``: the stage's hash from the plan (default: as the plan
    computes it, from ``params`` and the top level's hash). Raises ``ConfigError`` /
    ``DatasetError`` / ``UpstreamIncompleteError`` before writing anything,
    ``ConfigMismatchError`` if the marker has other settings.
    """
    from lib.curate.plan import curate_hash

    started = time.time()
    paths = run if isinstance(run, RunPaths) else RunPaths(run)
    storage = paths.storage
    if config_hash is None:
        top = level_marker(paths, n_levels)
        config_hash = curate_hash(params, n_levels, top.config_hash if top else "")
    marker_name = paths.marker(paths.curated, 0)
    rows_name = paths.curated_file("embedding_rows.npy")
    if valid_marker(storage, marker_name, config_hash, stage_dir=paths.curated) is not None:
        return np.asarray(read_npy(storage, rows_name))
    params.validate()
    storage.clean_temporaries(f"{paths.curated}/")  # one curate task: leftovers are its own
    verify_inputs(paths, n_levels, metadata)
    tree = ClusterTree.from_run(paths, n_levels)
    rows = hierarchical_sample(tree, params)
    table = None
    if isinstance(metadata, Path):
        table = curated_metadata(rows, metadata)
    elif metadata is not None:
        table = curated_metadata(rows, metadata, storage)
    discard_marker(storage, marker_name)  # a stale one goes before its outputs are rewritten
    outputs = publish_npy(storage, rows_name, rows)
    if table is not None:
        dataset_rows = table.column("row_index").to_numpy().astype(np.int64)
        outputs += publish_npy(storage, paths.curated_file("dataset_rows.npy"), dataset_rows)
        outputs.append(publish_table(storage, paths.curated_file("metadata.parquet"), table))
    write_marker(
        storage,
        marker_name,
        CompletionMarker(
            stage=stage,
            task=0,
            num_tasks=1,
            config_hash=config_hash,
            counts={"rows": len(rows), "unique_rows": len(np.unique(rows))},
            outputs=outputs,
            extra=asdict(params),
            wall_seconds=time.time() - started,
        ),
    )
    return rows
