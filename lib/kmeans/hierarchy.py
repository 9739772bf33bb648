"""Hierarchical k-means for data curation (Vo et al. 2024, arXiv 2405.15613), level by level.

Level 1 clusters the embeddings; level L > 1 clusters the centroids of level L-1. Within a
level, step 0 runs k-means on all the level's points; each resampling step s >= 1 draws
``sample_size`` points per cluster of step s-1 (``sampling_strategy``: ``"r"`` random,
``"c"`` closest to the centroid), runs k-means++ and Lloyd on that sample and reassigns
all the level's points to the new centroids. In split mode (``n_splits > 1``, no
resampling, ``lib.kmeans.split``) the clusters of step 0 are split further.

A job runs one level (``run_level``) inside ``lib.compute.distributed.process_group``;
all ranks compute, rank 0 alone writes. Everything is seeded from ``(seed, level, step)``,
so a relaunched job continues from the last complete step and ends with the same result
as an uninterrupted one; a finished level is skipped. Outputs (``lib.core.paths``,
``lib.formats.clusters``): per step its arrays and marker, then ``level{L}/final.json``
(the level's summary) and the level's own marker, last: the level is done when that
marker is valid.

A caller (the level job, a test, a notebook)::

    params = KmeansParams(n_clusters=[1000, 100], n_resampling_steps=[3, 1],
                          sample_size=[10, 5], seed=0)
    with process_group(device):
        run_level(run_dir, level, params, embeddings_path=..., device=..., config_hash=...)

``config_hash`` is the stage's hash from the plan; without one it is computed exactly as
the plan would (``lib.kmeans.plan.level_hash``) from the level's settings and its input
(the embeddings' identity, or level L-1's marker). Every marker of the level carries it,
so a run dir computed with other settings raises ``ConfigMismatchError`` instead of
being reused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lib.compute.comm import Comm
from lib.compute.devices import resolve_device
from lib.core.errors import ConfigError, DatasetError
from lib.core.markers import CompletionMarker, discard_marker, valid_marker, write_marker
from lib.core.paths import RunPaths, kmeans_level_stage, step_name
from lib.core.sharding import contiguous_range
from lib.formats.arrays import open_embeddings
from lib.formats.clusters import StepOutputs, load_level
from lib.kmeans.outputs import all_done, centroid_dtype, gather_to_root, publish_step
from lib.kmeans.params import KmeansBackend, KmeansParams
from lib.kmeans.plan import embeddings_identity, level_hash
from lib.kmeans.points import PointSet
from lib.kmeans.resample import resample_points
from lib.kmeans.solver import assign, kmeans, make_rng
from lib.kmeans.split import run_split

log = logging.getLogger(__name__)

# Stream keys of make_rng(seed, level, step, purpose): independent random streams.
_INIT, _SAMPLE = 0, 1
NONFINITE_EXAMPLES = 10


@dataclass
class LevelResult:
    """Summary of a finished level (also what ``final.json`` holds)."""

    level: int
    step: str
    n_points: int
    n_clusters: int
    dim: int
    inertia: float
    config_hash: str
    skipped: bool = False
    steps: list[dict] = field(default_factory=list)


def _paths(run: RunPaths | str | Path) -> RunPaths:
    return run if isinstance(run, RunPaths) else RunPaths(run)


def _level_input(
    paths: RunPaths, level: int, embeddings_path: str | Path | None
) -> tuple[np.ndarray, str, str]:
    """(points array, the input's hash for the level hash, name for messages) of ``level``."""
    if level == 1:
        if embeddings_path is None:
            raise ConfigError("k-means level 1 needs embeddings_path (the merged embeddings)")
        data = open_embeddings(embeddings_path)
        return data, embeddings_identity(embeddings_path, data), str(embeddings_path)
    final, out = load_level(paths, level - 1)
    data = out.centroids()
    return data, str(final["config_hash"]), paths.url(out.files.array("centroids"))


def check_finite(points: PointSet, comm: Comm, name: str, chunk_rows: int) -> None:
    """Raise ``DatasetError`` naming rows with NaN or Inf (all ranks raise together)."""
    start, stop = contiguous_range(points.n, comm.rank, comm.world)
    bad: list[np.ndarray] = []
    count = 0
    for a in range(start, stop, chunk_rows):
        block = np.asarray(points.read(a, min(a + chunk_rows, stop)))
        rows = np.nonzero(~np.isfinite(block).all(axis=1))[0] + a
        count += len(rows)
        if len(rows) and sum(len(b) for b in bad) < NONFINITE_EXAMPLES:
            bad.append(rows[:NONFINITE_EXAMPLES])
    total = comm.sum_(torch.tensor([count], dtype=torch.int64))
    if int(total.item()) == 0:
        return
    mine = np.concatenate(bad)[:NONFINITE_EXAMPLES] if bad else np.empty(0, dtype=np.int64)
    examples = comm.all_gather_rows(torch.from_numpy(mine.astype(np.int64))).numpy()
    examples = sorted(int(r) for r in examples)[:NONFINITE_EXAMPLES]
    raise DatasetError(
        f"{name}: {int(total.item())} rows contain NaN or Inf (rows {examples}"
        f"{', ...' if int(total.item()) > len(examples) else ''}); k-means cannot use them. "
        "Drop or fix these rows upstream (the merge stage reports them) and rerun"
    )


def _step_marker(paths: RunPaths, level: int, step: str, h: str) -> CompletionMarker | None:
    files = paths.kmeans_step(level, step)
    return valid_marker(paths.storage, paths.marker(files.dir, 0), h, stage_dir=files.dir)


def run_level(
    run: RunPaths | str | Path,
    level: int,
    params: KmeansParams,
    *,
    embeddings_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    comm: Comm | None = None,
    config_hash: str | None = None,
    on_step_done: Callable[[int, str], None] | None = None,
    stage: str | None = None,
) -> LevelResult:
    """Run (or resume, or skip) k-means level ``level`` of the hierarchy.

    Takes the run dir, the 1-based level, the parameters, the embeddings file (level 1
    only: .npy, .safetensors or raw with sidecar), this rank's device, the collectives
    (default: the current process group), the stage's config hash (default: as the plan
    computes it), an optional callback ``on_step_done(level, step_name)`` called on every
    rank once each step is complete, and the stage name the markers carry (default
    ``kmeans_level{L}``). Returns the level's ``LevelResult`` (``skipped=True`` if nothing
    had to be computed).

    Raises ``ConfigError`` (bad parameters, k larger than the number of points, a sample
    smaller than k), ``DatasetError`` (NaN/Inf rows), ``FileNotFoundError`` /
    ``ArrayFormatError`` (missing or malformed embeddings), ``UpstreamIncompleteError``
    (level L-1 not finished), ``ConfigMismatchError`` (the run dir holds this level
    computed with other settings). On an error nothing new looks complete.
    """
    params.validate()
    n_levels = params.levels()
    if not 1 <= level <= n_levels:
        raise ConfigError(f"level must be in 1..{n_levels}, got {level}")
    paths = _paths(run)
    storage = paths.storage
    stage = stage or kmeans_level_stage(level)
    comm = comm or Comm.current()
    if params.backend == KmeansBackend.faiss and comm.world > 1:
        raise ConfigError(
            f"kmeans backend=faiss runs in one process, but this job has {comm.world} ranks; "
            "use backend=torch or run the level with one task"
        )
    dev = resolve_device(device)
    data, upstream, name = _level_input(paths, level, embeddings_path)
    h = config_hash or level_hash(params, level, upstream)
    level_dir = paths.kmeans_level(level)
    level_marker_name = paths.marker(level_dir, 0)

    done = valid_marker(storage, level_marker_name, h, stage_dir=level_dir)
    if all_done(comm, done is not None):
        final = storage.read_json(paths.kmeans_final(level)) or {}
        keys = {f for f in LevelResult.__dataclass_fields__ if f != "skipped"}
        result = LevelResult(**{k: v for k, v in final.items() if k in keys}, skipped=True)
        log.info("k-means level %d is complete (%s), skipping", level, result.step)
        comm.barrier()
        return result

    n, dim = data.shape
    k = params.per_level("n_clusters", level)
    if k > n:
        raise ConfigError(
            f"level {level}: n_clusters={k} is larger than the number of points ({n} rows of "
            f"{name}); lower kmeans.n_clusters[{level - 1}]"
        )
    check_finite(PointSet(data), comm, name, params.chunk_rows)
    if comm.is_root:  # a stale level marker (outputs changed) goes first
        discard_marker(storage, level_marker_name)
    comm.barrier()

    n_steps = params.per_level("n_resampling_steps", level)
    split = params.per_level("n_splits", level) > 1
    out_dtype = centroid_dtype(data)
    summaries = []
    last = step_name(0)
    for s in range(n_steps):
        last = step_name(s)
        summaries.append(
            _run_step(paths, stage, level, s, params, data, h, dev, comm, out_dtype, k)
        )
        if on_step_done is not None:
            on_step_done(level, last)
    if split:
        last = "split"
        marker = _step_marker(paths, level, last, h)
        if all_done(comm, marker is not None):
            summaries.append({"step": last, "skipped": True, **marker.extra})
        else:
            summaries.append(run_split(paths, stage, level, params, data, h, dev, comm, out_dtype))
        if on_step_done is not None:
            on_step_done(level, last)

    final_marker = _step_marker(paths, level, last, h)
    result = LevelResult(
        level=level,
        step=last,
        n_points=n,
        n_clusters=int(final_marker.counts["clusters"]) if final_marker else k,
        dim=dim,
        inertia=float(final_marker.extra.get("inertia", float("nan"))) if final_marker else 0.0,
        config_hash=h,
        skipped=all(s.get("skipped") for s in summaries),
        steps=summaries,
    )
    if comm.is_root:
        steps = [step_name(s) for s in range(n_steps)] + (["split"] if split else [])
        checkpoints = [paths.marker(paths.kmeans_step(level, st).dir, 0) for st in steps]
        _publish_level(paths, stage, level, result, final_marker, name, checkpoints)
    comm.barrier()
    return result


def _publish_level(
    paths: RunPaths,
    stage: str,
    level: int,
    result: LevelResult,
    step_marker: CompletionMarker | None,
    input_name: str,
    checkpoints: list[str],
) -> None:
    """``final.json``, then the level's own marker, written last: a launcher checking
    stage markers sees the level complete only now. The marker names final.json and the
    final step's outputs (what the next level and curate read) and lists every step's
    marker (``checkpoints``: storage=sync pulls the steps' files by them)."""
    storage = paths.storage
    final_name = paths.kmeans_final(level)
    final = asdict(result)
    final.pop("skipped")
    final["input"] = input_name
    old = storage.read_json(final_name)
    if (
        result.skipped
        and old
        and (old.get("config_hash"), old.get("step"))
        == (
            result.config_hash,
            result.step,
        )
    ):
        final = old  # killed between final.json and the marker: the summary stands
    outputs = [storage.publish_json(final_name, final)]
    outputs += step_marker.outputs if step_marker else []
    write_marker(
        storage,
        paths.marker(paths.kmeans_level(level), 0),
        CompletionMarker(
            stage=stage,
            task=0,
            num_tasks=1,
            config_hash=result.config_hash,
            row_range=[0, result.n_points],
            counts={"points": result.n_points, "clusters": result.n_clusters},
            outputs=outputs,
            extra={"final_step": result.step, "inertia": result.inertia},
            checkpoints=checkpoints,
        ),
    )


def _run_step(
    paths: RunPaths,
    stage: str,
    level: int,
    s: int,
    params: KmeansParams,
    data: np.ndarray,
    h: str,
    dev: torch.device,
    comm: Comm,
    out_dtype: np.dtype,
    k: int,
) -> dict:
    step = step_name(s)
    marker = _step_marker(paths, level, step, h)
    if all_done(comm, marker is not None):
        log.info("k-means level %d %s is complete, skipping", level, step)
        return {"step": step, "skipped": True, **marker.extra}
    started = time.time()
    everything = PointSet(data)
    sample = None
    if s == 0:
        points = everything
    else:
        offsets, members = StepOutputs.at(paths, level, step_name(s - 1)).members()
        sample = resample_points(
            offsets,
            members,
            params.per_level("sample_size", level),
            params.sampling_strategy,
            make_rng(params.seed, level, s, _SAMPLE),
        )
        if len(sample) < k:
            raise ConfigError(
                f"level {level} step {s}: the sample has {len(sample)} points, fewer than "
                f"n_clusters={k} (sample_size={params.per_level('sample_size', level)} per "
                f"cluster); raise kmeans.sample_size[{level - 1}]"
            )
        points = PointSet(data, sample)
    res = kmeans(
        points, k, params, device=dev, comm=comm, rng=make_rng(params.seed, level, s, _INIT)
    )
    if s == 0:
        assignment, sq = res.assignment, res.sq_distances
    else:
        assignment, sq, _ = assign(
            everything,
            res.centroids,
            device=dev,
            comm=comm,
            compute_dtype=params.compute_dtype,
            chunk_rows=params.chunk_rows,
            cache_bytes=params.cache_bytes,
            allow_tf32=params.allow_tf32,
        )
    a_all = gather_to_root(comm, assignment)
    d_all = gather_to_root(comm, sq)
    inertia = float(comm.sum_(torch.tensor([float(sq.sum())], dtype=torch.float64)).item())
    extra = {
        "kind": "kmeans" if s == 0 else "resample",
        "inertia": inertia,
        "n_iters": res.n_iters,
        "converged": res.converged,
        "world_size": comm.world,
        "device": str(dev),
        "seconds": res.seconds,
    }
    if comm.is_root:
        publish_step(
            paths,
            stage,
            level,
            step,
            h,
            res.centroids,
            a_all,
            d_all,
            out_dtype=out_dtype,
            save_distances=params.save_distances,
            sample=sample,
            extra=extra,
            started=started,
        )
    comm.barrier()
    log.info("k-means level %d %s: k=%d, inertia %.6g", level, step, k, inertia)
    return {"step": step, "skipped": False, **extra}


def run_hierarchy(
    run: RunPaths | str | Path,
    params: KmeansParams,
    embeddings_path: str | Path,
    *,
    device: torch.device | str = "cpu",
    comm: Comm | None = None,
) -> list[LevelResult]:
    """Run levels 1..n_levels in this process (the pipeline runs one job per level)."""
    return [
        run_level(
            run,
            level,
            params,
            embeddings_path=embeddings_path,
            device=device,
            comm=comm,
        )
        for level in range(1, params.levels() + 1)
    ]
