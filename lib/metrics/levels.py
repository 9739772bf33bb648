"""Metrics of a hierarchical k-means clustering, level by level, with published outputs.

``flatten_levels`` turns the hierarchy (level L>1 clusters the centroids of level L-1,
``lib.formats.clusters``) into one cluster id per embedding row at each level.
``run_metrics_level`` computes ``lib.metrics.compute`` for one level on all ranks and has
rank 0 publish, then the level's completion marker::

    <out>/level{L}/metrics.json        scalars, timings, inputs and settings
    <out>/level{L}/per_cluster.parquet size, inertia, mean/max distance, nearest other
                                       centroid, silhouette, simplified silhouette
    <out>/level{L}/examples.json       best/worst clusters by inertia per point and by
                                       silhouette, with their rows nearest the centroid
                                       and those rows' text from the metadata
    <out>/level{L}/completions/task_00000.json

``<out>`` is ``metrics/`` in the run dir for the pipeline stage, ``metrics.output_dir``
(default ``<clustering run dir>/metrics``) for a named clustering.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lib.compute.comm import Comm
from lib.core.errors import DatasetError, InvalidMarkerError
from lib.core.markers import CompletionMarker, discard_marker, require_intact, write_marker
from lib.core.paths import MERGE_DIR, MERGE_EMBEDDINGS, METRICS_FILES, RunPaths, metrics_level_stage
from lib.core.sharding import contiguous_range
from lib.core.storage import Storage
from lib.formats.arrays import open_embeddings
from lib.formats.clusters import load_level
from lib.formats.parquet import publish_table
from lib.metrics.blocks import ClusterMetricsError, check_labels
from lib.metrics.compute import ClusterMetrics, compute_metrics
from lib.metrics.params import MetricsParams
from lib.metrics.scratch import Scratch

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 500


@dataclass(frozen=True)
class ClusteringInputs:
    """What a clustering is: a run dir with ``kmeans/`` output, its embeddings and metadata
    (local files: a cached copy when the run dir is on an object store)."""

    name: str
    run: RunPaths
    embeddings: Path
    metadata: Path | None
    text_field: str = "text"


@dataclass(frozen=True)
class MetricsOutput:
    """Where a level's metrics go: ``root/level{L}/`` in ``storage``."""

    storage: Storage
    root: str = ""

    def name(self, level: int, file: str) -> str:
        return RunPaths.metrics_file(level, file, self.root)

    def url(self, level: int) -> str:
        return self.storage.url(RunPaths.metrics_level(level, self.root))


def _merge_outputs_read(inputs: ClusteringInputs) -> list[str]:
    """The merge stage's outputs in ``inputs.run`` that ``inputs`` reads (its embeddings,
    its metadata), by name; none for files from elsewhere."""
    storage = inputs.run.storage
    marker = storage.read_json(RunPaths.marker(MERGE_DIR, 0)) or {}
    wanted = {Path(p).resolve() for p in (inputs.embeddings, inputs.metadata) if p is not None}
    candidates = {RunPaths.merge_embeddings(f) for f in MERGE_EMBEDDINGS}
    candidates.add(RunPaths.merge_metadata)
    names = []
    for out in marker.get("outputs", []):
        name = out.get("path") if isinstance(out, dict) else None
        if name not in candidates:
            continue
        try:
            local = storage.local_path(name)
        except FileNotFoundError:
            continue
        if Path(local).resolve() in wanted:
            names.append(name)
    return names


def verify_inputs(inputs: ClusteringInputs, levels: list[int], comm: Comm | None = None) -> None:
    """Check (sha256) what the metrics of ``levels`` read against its markers: k-means
    levels 1..max and the merged embeddings and metadata. Rank 0 checks; a file that no
    longer matches invalidates its marker, and every rank raises ``InvalidMarkerError``."""
    comm = comm or Comm.current()

    def check() -> None:
        storage = inputs.run.storage
        for level in range(1, max(levels) + 1):
            require_intact(storage, RunPaths.marker(RunPaths.kmeans_level(level), 0))
        if read := _merge_outputs_read(inputs):
            require_intact(storage, RunPaths.marker(MERGE_DIR, 0), only=read)

    comm.check_on_root(check, InvalidMarkerError)


def flatten_levels(
    run: RunPaths, levels: list[int], n_points: int
) -> dict[int, tuple[np.ndarray, int]]:
    """Cluster of every embedding row at each of ``levels``: {level: (labels (N,), k)}.

    Level 1's assignment gives each row's cluster; level L > 1's assignment maps each
    level L-1 cluster to a level L cluster, so a row's level-L cluster is composed through
    the levels below. Raises ``UpstreamIncompleteError`` for an unfinished level,
    ``ClusterMetricsError`` when an assignment's length disagrees with its points,
    ``ArrayFormatError`` when an array disagrees with its sidecar.
    """
    out: dict[int, tuple[np.ndarray, int]] = {}
    labels: np.ndarray | None = None
    prev_k = n_points
    for level in range(1, max(levels) + 1):
        _, step = load_level(run, level)
        k = int(step.centroids().shape[0])
        assign = step.assignment()
        what = f"{run.url(step.files.array('assignment'))} (level {level})"
        if len(assign) != prev_k:
            points = "embedding rows" if level == 1 else f"level {level - 1} clusters"
            raise ClusterMetricsError(
                f"{what} has {len(assign)} entries but there are {prev_k} {points}: the "
                "clustering was computed on other inputs; point the clustering at the "
                "embeddings and run dir it was made from"
            )
        assign = check_labels(np.asarray(assign), prev_k, k, what)
        labels = assign if labels is None else assign[labels]
        if level in levels:
            out[level] = (labels, k)
        prev_k = k
    return out


@dataclass
class LevelReport:
    level: int
    scalars: dict[str, Any]
    per_cluster: dict[str, np.ndarray]
    examples: list[dict]
    out_dir: str  # where the level's files are (a path or URL)


def run_metrics_level(
    inputs: ClusteringInputs,
    level: int,
    labels: np.ndarray,
    k: int,
    params: MetricsParams,
    out: MetricsOutput,
    *,
    scratch_dir: Path,
    config_hash: str,
    stage: str | None = None,
    comm: Comm | None = None,
) -> LevelReport | None:
    """Compute and publish the metrics of one level, then its completion marker (stage
    ``stage``, default ``metrics_level{L}``, with ``config_hash``). Returns the report on
    rank 0, else None."""
    t0 = time.perf_counter()
    comm = comm or Comm.current()
    if comm.is_root:  # one task per level: temporaries in its dir are a killed attempt's
        out.storage.clean_temporaries(f"{RunPaths.metrics_level(level, out.root)}/")
    X = open_embeddings(inputs.embeddings)
    key = hashlib.sha256(f"{inputs.run.root}|{level}|{X.shape}|{k}".encode())
    scratch = Scratch(
        scratch_dir / f"embedfleet-metrics-{key.hexdigest()[:16]}" / f"level{level}", comm.rank
    )
    try:
        result = compute_metrics(
            X, labels, k, params, scratch, comm=comm, progress=lambda m: log.info("%s", m)
        )
        candidates = _example_candidates(result, labels, scratch, params, comm)
    finally:
        scratch.cleanup()
    if not comm.is_root:
        comm.barrier()
        return None
    examples = _examples(result, candidates, inputs, params)
    scalars = {"level": level, **result.scalars}
    doc = {
        **scalars,
        "clustering": inputs.name,
        "run_dir": inputs.run.root,
        "embeddings": str(inputs.embeddings),
        "world_size": comm.world,
        "params": {f.name: getattr(params, f.name) for f in fields(MetricsParams)},
        "timings_s": result.timings,
    }
    storage = out.storage
    marker_name = RunPaths.marker(RunPaths.metrics_level(level, out.root), 0)
    discard_marker(storage, marker_name)  # goes before the outputs it describes are rewritten
    metrics_json, per_cluster, examples_json = METRICS_FILES
    outputs = [
        publish_table(storage, out.name(level, per_cluster), pa.table(result.per_cluster)),
        storage.publish_json(out.name(level, examples_json), examples),
        storage.publish_json(out.name(level, metrics_json), doc),
    ]
    write_marker(
        storage,
        marker_name,
        CompletionMarker(
            stage=stage or metrics_level_stage(level),
            task=0,
            num_tasks=1,
            config_hash=config_hash,
            counts={"points": int(scalars["n_points"]), "clusters": int(scalars["k"])},
            outputs=outputs,
            extra={k: v for k, v in scalars.items() if isinstance(v, int | float)},
            wall_seconds=time.perf_counter() - t0,
        ),
    )
    comm.barrier()
    return LevelReport(level, scalars, result.per_cluster, examples, out.url(level))


# -- best and worst clusters --------------------------------------------------------------
def chosen_clusters(per: dict[str, np.ndarray], n_show: int) -> dict[str, list[int]]:
    """Cluster ids of the best/worst ``n_show`` by inertia per point (clusters of >= 2
    points) and by mean silhouette (when computed)."""
    size = per["size"]
    out: dict[str, list[int]] = {}
    msd = per["mean_sq_distance"]
    ok = np.flatnonzero((size >= 2) & np.isfinite(msd))
    order = ok[np.argsort(msd[ok], kind="stable")]
    out["best_by_inertia"] = order[:n_show].tolist()
    out["worst_by_inertia"] = order[::-1][:n_show].tolist()
    if "silhouette" in per:
        sil = per["silhouette"]
        ok = np.flatnonzero((size >= 2) & np.isfinite(sil))
        order = ok[np.argsort(-sil[ok], kind="stable")]
        out["best_by_silhouette"] = order[:n_show].tolist()
        out["worst_by_silhouette"] = order[::-1][:n_show].tolist()
    return out


def _example_candidates(
    result: ClusterMetrics, labels: np.ndarray, scratch: Scratch, params: MetricsParams, comm: Comm
) -> np.ndarray | None:
    """(cluster, row, distance) rows: each rank's nearest ``n_examples`` rows of every
    chosen cluster, gathered on rank 0."""
    n_examples = params.n_examples
    chosen = sorted(
        {c for ids in chosen_clusters(result.per_cluster, params.n_show).values() for c in ids}
    )
    lo, hi = contiguous_range(len(labels), comm.rank, comm.world)
    own = scratch.open("own_dist", (hi - lo,), "float64")
    local = labels[lo:hi]
    parts = []
    for c in chosen:
        rows = np.flatnonzero(local == c)
        if len(rows) == 0:
            continue
        d = np.asarray(own[rows])
        take = np.argsort(d, kind="stable")[:n_examples]
        parts.append(np.stack([np.full(len(take), c), rows[take] + lo, d[take]], axis=1))
    mine = np.concatenate(parts) if parts else np.zeros((0, 3))
    gathered = comm.gather_rows(torch.from_numpy(mine.astype(np.float64)))
    return None if gathered is None else gathered.numpy()


def _examples(
    result: ClusterMetrics,
    candidates: np.ndarray | None,
    inputs: ClusteringInputs,
    params: MetricsParams,
) -> list[dict]:
    n_examples, n_show = params.n_examples, params.n_show
    per = result.per_cluster
    picks: dict[int, list[tuple[int, float]]] = {}
    if candidates is not None and len(candidates):
        for c in np.unique(candidates[:, 0]).astype(np.int64):
            mine = candidates[candidates[:, 0] == c]
            mine = mine[np.lexsort((mine[:, 1], mine[:, 2]))][:n_examples]
            picks[int(c)] = [(int(r), float(d)) for _, r, d in mine]
    all_rows = sorted({r for rows in picks.values() for r, _ in rows})
    texts = read_texts(inputs.metadata, inputs.text_field, all_rows)
    out = []
    for kind, ids in chosen_clusters(per, n_show).items():
        for rank_, c in enumerate(ids):
            entry = {
                "kind": kind,
                "rank": rank_ + 1,
                "cluster": int(c),
                "size": int(per["size"][c]),
                "mean_sq_distance": float(per["mean_sq_distance"][c]),
                "silhouette": float(per["silhouette"][c]) if "silhouette" in per else None,
                "rows": [
                    {"row": r, "distance": d, "text": texts.get(r)} for r, d in picks.get(c, [])
                ],
            }
            out.append(entry)
    return out


# The columns dataset.keep_text gives a chat run's metadata, shown as an example's text.
CHAT_COLUMNS = ("user_prompt", "response_text")


def read_texts(metadata: Path | None, column: str, rows: list[int]) -> dict[int, str | None]:
    """Text of the given rows of a metadata parquet, reading only the row groups holding
    them. ``text`` of a chat run (``dataset.keep_text``) is its ``user_prompt`` and
    ``response_text``. Without a ``column`` column (``dataset.keep_text=false``, and no
    ``dataset.metadata_fields`` of that name) the row is shown as ``source/id``. Rows past
    the end are an error (metadata of other embeddings)."""
    if metadata is None or not rows:
        return {}
    pf = pq.ParquetFile(metadata)
    names = pf.schema_arrow.names
    sep = "/"
    if column in names:
        cols = [column]
    elif column == "text" and all(c in names for c in CHAT_COLUMNS):
        # A chat run's metadata (dataset.keep_text): its prompt and response.
        cols, sep = list(CHAT_COLUMNS), "\n\n"
    else:
        cols = [c for c in ("source", "id") if c in names]
        log.warning(
            "%s has no column %r (columns: %s); showing %s instead: set clustering.text_field "
            "or add the text to dataset.metadata_fields",
            metadata,
            column,
            names,
            "/".join(cols) or "nothing",
        )
        if not cols:
            return {}
    n = pf.metadata.num_rows
    if rows[-1] >= n:
        raise DatasetError(
            f"{metadata} has {n} rows but row {rows[-1]} was asked for: the metadata does not "
            "belong to these embeddings; set clustering.metadata"
        )
    out: dict[int, str | None] = {}
    start = 0
    want = np.asarray(rows)
    for g in range(pf.num_row_groups):
        stop = start + pf.metadata.row_group(g).num_rows
        here = want[(want >= start) & (want < stop)]
        if len(here):
            table = pf.read_row_group(g, columns=cols)
            for r in here.tolist():
                vals = [table.column(i)[r - start].as_py() for i in range(len(cols))]
                text = (
                    None
                    if all(v is None for v in vals)
                    else sep.join(str(v) for v in vals if v is not None)
                )
                out[r] = None if text is None else text[:MAX_TEXT_CHARS]
        start = stop
    return out
