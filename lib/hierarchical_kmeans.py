"""Hierarchical k-means for data curation (Vo et al. 2024, arXiv 2405.15613), level by level.

Level 1 clusters the embeddings; level L > 1 clusters the centroids of level L-1. Within a
level, step 0 runs k-means on all the level's points; each resampling step s >= 1 draws
``sample_size`` points per cluster of step s-1 (``sampling_strategy``: ``"r"`` random,
``"c"`` closest to the centroid), runs k-means++ and Lloyd on that sample and reassigns
all the level's points to the new centroids. In split mode (``n_splits > 1``, no
resampling) the clusters of step 0 are pre-clusters, each split into
``min(n_splits, size)`` clusters by its own k-means; empty sub-clusters are dropped.

A job runs one level (``run_level``) inside ``lib.distributed.process_group``; all ranks
compute, rank 0 alone writes. Everything is seeded from ``(seed, level, step)``, so a
relaunched job continues from the last complete step and ends with the same result as
an uninterrupted one; a finished level is skipped. Outputs (``<run_dir>/kmeans/``)::

    level{L}/step{s}/centroids.npy        (k, D)  float32 (float64 if the input is)
    level{L}/step{s}/assignment.npy       (N_L,)  int64   cluster of each point
    level{L}/step{s}/members_offsets.npy  (k+1,)  int64   CSR offsets into members
    level{L}/step{s}/members.npy          (N_L,)  int64   points of cluster c are
                                          members[offsets[c]:offsets[c+1]], nearest first
    level{L}/step{s}/distances.npy        (N_L,)  float32 squared distance to own centroid
                                          (``save_distances``)
    level{L}/step{s}/sample.npy           (m,)    int64   points step s >= 1 clustered
    level{L}/step{s}/completions/task_00000.json   completion marker (lib.markers)
    level{L}/split/...                    split mode: the same files for the final clusters
    level{L}/final.json                   {"step": "step{s}" | "split", ...}
    level{L}/completions/task_00000.json  the level's marker, written last

Every array has a ``.json`` sidecar (``lib.arrays``). Points of level 1 are rows of the
embeddings file; points of level L > 1 are clusters of level L-1 (rows of its final
``centroids.npy``). Members ties are broken by point index. Nothing is pickled.

A job calls::

    params = HierarchyParams(n_levels=2, n_clusters=[1000, 100], n_resampling_steps=[3, 1],
                             sample_size=[10, 5], n_splits=[1, 1], seed=0)
    params.validate()
    with process_group(device):
        run_level(run_dir, level, params, embeddings_path=..., device=..., config_hash=...)

``config_hash`` is the job's hash of its stage config (any string); the step markers and
``final.json`` carry a hash of it, the level's parameters, the input's shape and the
previous level's hash, so a run dir computed with other settings raises
``ConfigMismatchError`` instead of being reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lib.arrays import load_npy, open_embeddings, save_npy
from lib.errors import ConfigError, DatasetError, UpstreamIncompleteError
from lib.fsio import atomic_write_json, remove_stale_temporaries
from lib.kmeans import KMeansParams, assign, kmeans, make_rng, resolve_device
from lib.kmeans_points import DEFAULT_CHUNK_ROWS, Comm, PointSet
from lib.markers import (
    CompletionMarker,
    ConfigMismatchError,
    check_marker,
    describe_outputs,
    marker_path,
    write_marker,
)
from lib.sharding import contiguous_range

log = logging.getLogger(__name__)

STAGE_ROOT = "kmeans"
SAMPLING_STRATEGIES = ("r", "c")
# Stream keys of make_rng(seed, level, step, purpose): independent random streams.
_INIT, _SAMPLE, _SPLIT = 0, 1, 2
_SPLIT_STEP = 1_000_000  # the "step" number of split mode in seeds (steps stay small)
NONFINITE_EXAMPLES = 10


_LEVEL_LISTS = ("n_clusters", "n_resampling_steps", "sample_size", "n_splits")


def checked_keys(cls: type, cfg: Mapping[str, Any], section: str) -> dict[str, Any]:
    """``cfg`` as a dict, after checking its keys against the dataclass ``cls``."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ConfigError(f"unknown {section} settings {unknown}; valid ones: {sorted(known)}")
    required = [
        name
        for name, f in known.items()
        if f.default is MISSING and f.default_factory is MISSING and name not in cfg
    ]
    if required:
        raise ConfigError(f"missing {section} settings {required}")
    return dict(cfg)


@dataclass(frozen=True)
class HierarchyParams:
    """Configuration of the whole hierarchy; per-level settings are lists of length n_levels.

    ``n_resampling_steps[i]`` is the number of steps of level i+1, step 0 included, as in
    the reference implementation: 1 means plain k-means, 3 means two resampling steps.
    ``dtype`` is the accumulation dtype of the Lloyd sums (float64 default);
    ``compute_dtype`` that of the distance products.
    """

    n_levels: int
    n_clusters: list[int]
    n_resampling_steps: list[int]
    sample_size: list[int]
    n_splits: list[int]
    n_iters: int = 50
    tol: float = 0.0
    init: str = "kmeans++"
    sampling_strategy: str = "r"
    dtype: str = "float64"
    compute_dtype: str = "float32"
    seed: int = 0
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    cache_bytes: int | None = None
    backend: str = "torch"
    allow_tf32: bool = False
    bounds: bool | None = None
    save_distances: bool = True

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> HierarchyParams:
        """Build and validate from a plain mapping (e.g. ``OmegaConf.to_container`` of the
        job's ``kmeans`` config). Raises ``ConfigError`` naming unknown or missing keys."""
        values = checked_keys(cls, cfg, "kmeans")
        for key in _LEVEL_LISTS:
            if key in values:
                values[key] = [int(v) for v in values[key]]
        params = cls(**values)
        params.validate()
        return params

    def validate(self) -> None:
        """Raise ``ConfigError`` with the offending key and a fix."""
        if self.n_levels < 1:
            raise ConfigError(f"kmeans.n_levels must be >= 1, got {self.n_levels}")
        for name in _LEVEL_LISTS:
            values = list(getattr(self, name))
            if len(values) != self.n_levels:
                raise ConfigError(
                    f"kmeans.{name} has {len(values)} entries {values} but n_levels="
                    f"{self.n_levels}: give one value per level"
                )
            for i, v in enumerate(values):
                if int(v) < 1:
                    what = "a sample_size of 0 draws nothing" if name == "sample_size" else ""
                    raise ConfigError(
                        f"kmeans.{name}[{i}] (level {i + 1}) must be >= 1, got {v}"
                        + (f" ({what})" if what else "")
                    )
        for i in range(self.n_levels):
            if self.n_splits[i] > 1 and self.n_resampling_steps[i] > 1:
                raise ConfigError(
                    f"level {i + 1}: n_splits={self.n_splits[i]} (split mode) cannot be combined "
                    f"with n_resampling_steps={self.n_resampling_steps[i]}; set one of them to 1"
                )
        for i in range(1, self.n_levels):
            most = self.n_clusters[i - 1] * self.n_splits[i - 1]
            if self.n_clusters[i] > most:
                raise ConfigError(
                    f"level {i + 1}: n_clusters={self.n_clusters[i]} exceeds the at most {most} "
                    f"clusters of level {i} it clusters; lower it"
                )
        if self.sampling_strategy not in SAMPLING_STRATEGIES:
            raise ConfigError(
                f"kmeans.sampling_strategy must be 'r' (random) or 'c' (closest), "
                f"got {self.sampling_strategy!r}"
            )
        self.kmeans_params(1).validate()

    def kmeans_params(self, level: int, n_clusters: int | None = None) -> KMeansParams:
        """The k-means parameters of ``level`` (1-based)."""
        return KMeansParams(
            n_clusters=int(n_clusters or self.n_clusters[level - 1]),
            n_iters=self.n_iters,
            tol=self.tol,
            init=self.init,
            seed=self.seed,
            accum_dtype=self.dtype,
            compute_dtype=self.compute_dtype,
            chunk_rows=self.chunk_rows,
            cache_bytes=self.cache_bytes,
            bounds=self.bounds,
            allow_tf32=self.allow_tf32,
            backend=self.backend,
        )

    def level_json(self, level: int) -> dict:
        """The settings that determine ``level``'s result (for its config hash)."""
        shared = asdict(self)
        for key in ("n_levels", *_LEVEL_LISTS):
            shared.pop(key)
        for key in ("chunk_rows", "cache_bytes", "save_distances"):  # no effect on results
            shared.pop(key)
        i = level - 1
        return {
            **shared,
            "level": level,
            "n_clusters": int(self.n_clusters[i]),
            "n_resampling_steps": int(self.n_resampling_steps[i]),
            "sample_size": int(self.sample_size[i]),
            "n_splits": int(self.n_splits[i]),
        }


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


def level_dir(run_dir: str | Path, level: int) -> Path:
    return Path(run_dir) / STAGE_ROOT / f"level{level}"


def stage_dir(level: int, step: str) -> str:
    """Stage dir of a step's marker, relative to the run dir: ``kmeans/level1/step0``."""
    return f"{STAGE_ROOT}/level{level}/{step}"


def read_final(run_dir: str | Path, level: int) -> dict | None:
    path = level_dir(run_dir, level) / "final.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


@dataclass
class StepOutputs:
    """Read access to one step's published arrays (memory-mapped, sidecar-checked)."""

    dir: Path

    def centroids(self) -> np.ndarray:
        return load_npy(self.dir / "centroids.npy", shape=(None, None))

    def assignment(self) -> np.ndarray:
        return load_npy(self.dir / "assignment.npy", shape=(None,), dtype="int64")

    def members(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets (k+1,), members (N,)): cluster c is members[offsets[c]:offsets[c+1]]."""
        offsets = load_npy(self.dir / "members_offsets.npy", shape=(None,), dtype="int64")
        members = load_npy(self.dir / "members.npy", shape=(None,), dtype="int64")
        if int(offsets[-1]) != len(members):
            raise DatasetError(
                f"{self.dir}: members_offsets ends at {int(offsets[-1])} but "
                f"members has {len(members)} entries; rerun the level"
            )
        return np.asarray(offsets), members

    def distances(self) -> np.ndarray:
        return load_npy(self.dir / "distances.npy", shape=(None,))


def load_level(run_dir: str | Path, level: int) -> tuple[dict, StepOutputs]:
    """``final.json`` of a finished level and its final step's outputs.

    Raises ``UpstreamIncompleteError`` when the level has not finished.
    """
    final = read_final(run_dir, level)
    if final is None:
        raise UpstreamIncompleteError(
            f"k-means level {level} has not finished: {level_dir(run_dir, level)}/final.json is "
            f"missing; run level {level} first"
        )
    return final, StepOutputs(level_dir(run_dir, level) / final["step"])


# -- inputs and validation ----------------------------------------------------------------
def _level_input(
    run_dir: Path, level: int, embeddings_path: str | Path | None
) -> tuple[np.ndarray, dict, str]:
    """(points array, identity for the hash, name for messages) of ``level``."""
    if level == 1:
        if embeddings_path is None:
            raise ConfigError("k-means level 1 needs embeddings_path (the merged embeddings)")
        data = open_embeddings(embeddings_path)
        ident = {"shape": list(data.shape), "dtype": str(data.dtype)}
        return data, ident, str(embeddings_path)
    final, out = load_level(run_dir, level - 1)
    data = out.centroids()
    ident = {
        "shape": list(data.shape),
        "dtype": str(data.dtype),
        "previous_level": final["config_hash"],
    }
    return data, ident, str(out.dir / "centroids.npy")


def level_config_hash(params: HierarchyParams, level: int, ident: dict, config_hash: str) -> str:
    blob = json.dumps(
        {"job": config_hash, "level": params.level_json(level), "input": ident}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


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


# -- sampling for resampling steps --------------------------------------------------------
def resample_points(
    offsets: np.ndarray,
    members: np.ndarray,
    sample_size: int,
    strategy: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """Up to ``sample_size`` points of every cluster, sorted ascending (int64).

    ``"c"`` takes each cluster's first members (nearest to the centroid); ``"r"`` a
    uniformly random subset drawn from ``rng``.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    sizes = np.diff(offsets)
    take = np.minimum(sizes, sample_size)
    if strategy == "c":
        starts = np.repeat(offsets[:-1], take)
        within = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
        picked = np.asarray(members[starts + within])
    elif strategy == "r":
        cluster = np.repeat(np.arange(len(sizes)), sizes)
        order = np.lexsort((rng.random(len(cluster)), cluster))  # shuffled within clusters
        rank_in_cluster = np.arange(len(cluster)) - np.repeat(offsets[:-1], sizes)
        picked = np.asarray(members[order[rank_in_cluster < take[cluster]]])
    else:
        raise ConfigError(f"sampling_strategy must be 'r' or 'c', got {strategy!r}")
    return np.sort(picked).astype(np.int64)


# -- outputs ------------------------------------------------------------------------------
def build_members(
    assignment: np.ndarray, sq_distances: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """CSR of clusters: (offsets (k+1,), members (N,)), each cluster nearest first."""
    order = np.lexsort((sq_distances, assignment))  # stable: equal distances by index
    counts = np.bincount(assignment, minlength=k)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return offsets, order.astype(np.int64)


def _centroid_dtype(data: np.ndarray) -> np.dtype:
    return np.dtype("float64") if data.dtype == np.float64 else np.dtype("float32")


def _publish_step(
    run_dir: Path,
    level: int,
    step: str,
    config_hash: str,
    centroids: np.ndarray,
    assignment: np.ndarray,
    sq_distances: np.ndarray,
    out_dtype: np.dtype,
    save_distances: bool,
    sample: np.ndarray | None,
    extra: dict,
    started: float,
) -> None:
    """Write a step's arrays, then its marker (rank 0 only)."""
    out = level_dir(run_dir, level) / step
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    k = len(centroids)
    offsets, members = build_members(assignment, sq_distances, k)
    files = [
        out / "centroids.npy",
        out / "assignment.npy",
        out / "members_offsets.npy",
        out / "members.npy",
    ]
    save_npy(files[0], centroids.astype(out_dtype))
    save_npy(files[1], assignment.astype(np.int64))
    save_npy(files[2], offsets)
    save_npy(files[3], members)
    if save_distances:
        files.append(out / "distances.npy")
        save_npy(files[-1], sq_distances.astype(np.float32))
    if sample is not None:
        files.append(out / "sample.npy")
        save_npy(files[-1], sample)
    sidecars = [f.with_name(f.name + ".json") for f in files]
    sizes = np.diff(offsets)
    marker = CompletionMarker(
        stage=stage_dir(level, step),
        task=0,
        num_tasks=1,
        config_hash=config_hash,
        row_range=[0, len(assignment)],
        counts={
            "points": len(assignment),
            "clusters": k,
            "empty_clusters": int((sizes == 0).sum()),
            "sample_points": 0 if sample is None else len(sample),
        },
        outputs=describe_outputs(run_dir, files + sidecars),
        extra=extra,
        wall_seconds=time.time() - started,
    )
    write_marker(run_dir, stage_dir(level, step), marker)


def _gather_to_root(comm: Comm, local: np.ndarray) -> np.ndarray | None:
    out = comm.gather_rows(torch.from_numpy(np.ascontiguousarray(local)))
    return None if out is None else out.numpy()


def _all_done(comm: Comm, done: bool) -> bool:
    """True only if every rank found the step complete (they all read the same files)."""
    flag = comm.max_(torch.tensor([0 if done else 1], dtype=torch.int64))
    return int(flag.item()) == 0


# -- one level ----------------------------------------------------------------------------
def run_level(
    run_dir: str | Path,
    level: int,
    params: HierarchyParams,
    *,
    embeddings_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    comm: Comm | None = None,
    config_hash: str = "",
    on_step_done: Callable[[int, str], None] | None = None,
    stage_hash: str | None = None,
) -> LevelResult:
    """Run (or resume, or skip) k-means level ``level`` of the hierarchy.

    Takes the run dir, the 1-based level, the validated parameters, the embeddings file
    (level 1 only: .npy, .safetensors or raw with sidecar), this rank's device, the
    collectives (default: the current process group), the job's config hash and an
    optional callback ``on_step_done(level, step_name)`` called on every rank once each
    step is complete (published now or found complete from an earlier launch). Returns
    the level's ``LevelResult`` (``skipped=True`` if it was already complete).
    ``stage_hash``: the config hash the level's own marker carries (a pipeline passes its
    stage's hash, so its launcher's marker check reads the level marker); default the
    level's hash. The level hash is kept in the marker's ``extra["level_hash"]``.

    Raises ``ConfigError`` (bad parameters, k larger than the number of points, a sample
    smaller than k), ``DatasetError`` (NaN/Inf rows), ``FileNotFoundError`` /
    ``ArrayFormatError`` (missing or malformed embeddings), ``UpstreamIncompleteError``
    (level L-1 not finished), ``ConfigMismatchError`` (the run dir holds this level
    computed with other settings). On an error nothing new looks complete.
    """
    params.validate()
    if not 1 <= level <= params.n_levels:
        raise ConfigError(f"level must be in 1..{params.n_levels}, got {level}")
    run_dir = Path(run_dir)
    comm = comm or Comm.current()
    if params.backend == "faiss" and comm.world > 1:
        raise ConfigError(
            f"kmeans backend=faiss runs in one process, but this job has {comm.world} ranks; "
            "use backend=torch or run the level with one task"
        )
    dev = resolve_device(device)
    data, ident, name = _level_input(run_dir, level, embeddings_path)
    h = level_config_hash(params, level, ident, config_hash)
    ldir = level_dir(run_dir, level)

    marker_hash = h if stage_hash is None else stage_hash
    done = _finished(run_dir, level, h)
    if _all_done(comm, done is not None):
        log.info("k-means level %d is complete (%s), skipping", level, done.step)
        level_stage = f"{STAGE_ROOT}/level{level}"
        if comm.is_root and check_marker(run_dir, level_stage, 0, marker_hash) is None:
            # killed between final.json and the level marker: finish the publication
            step_marker = check_marker(run_dir, stage_dir(level, done.step), 0, h)
            _write_level_marker(run_dir, level, h, done, step_marker, marker_hash)
        comm.barrier()
        done.skipped = True
        return done

    n, dim = data.shape
    k = int(params.n_clusters[level - 1])
    if k > n:
        raise ConfigError(
            f"level {level}: n_clusters={k} is larger than the number of points ({n} rows of "
            f"{name}); lower kmeans.n_clusters[{level - 1}]"
        )
    check_finite(PointSet(data), comm, name, params.chunk_rows)
    if comm.is_root:  # recomputing: drop the stale pointer and level marker first
        marker_path(run_dir, f"{STAGE_ROOT}/level{level}", 0).unlink(missing_ok=True)
        (ldir / "final.json").unlink(missing_ok=True)
    comm.barrier()

    n_steps = int(params.n_resampling_steps[level - 1])
    split = int(params.n_splits[level - 1]) > 1
    out_dtype = _centroid_dtype(data)
    summaries = []
    last = None
    for s in range(n_steps):
        step = f"step{s}"
        summaries.append(_run_step(run_dir, level, s, params, data, h, dev, comm, out_dtype, k))
        last = step
        if on_step_done is not None:
            on_step_done(level, step)
    if split:
        summaries.append(_run_split(run_dir, level, params, data, h, dev, comm, out_dtype))
        last = "split"
        if on_step_done is not None:
            on_step_done(level, last)

    final_marker = check_marker(run_dir, stage_dir(level, last), 0, h)
    result = LevelResult(
        level=level,
        step=last,
        n_points=n,
        n_clusters=int(final_marker.counts["clusters"]) if final_marker else k,
        dim=dim,
        inertia=float(final_marker.extra.get("inertia", float("nan"))) if final_marker else 0.0,
        config_hash=h,
        steps=summaries,
    )
    if comm.is_root:
        final = asdict(result)
        final.pop("skipped")
        final["input"] = {**ident, "name": name}
        atomic_write_json(ldir / "final.json", final)
        _write_level_marker(run_dir, level, h, result, final_marker, marker_hash)
    comm.barrier()
    return result


def _write_level_marker(
    run_dir: Path,
    level: int,
    h: str,
    result: LevelResult,
    step_marker: CompletionMarker | None,
    marker_hash: str,
) -> None:
    """The level's own marker (``kmeans/level{L}/completions/task_00000.json``), written
    last: a launcher checking stage markers sees the level complete only now."""
    ldir = level_dir(run_dir, level)
    step_outputs = step_marker.outputs if step_marker is not None else []
    write_marker(
        run_dir,
        f"{STAGE_ROOT}/level{level}",
        CompletionMarker(
            stage=f"{STAGE_ROOT}/level{level}",
            task=0,
            num_tasks=1,
            config_hash=marker_hash,
            row_range=[0, result.n_points],
            counts={"points": result.n_points, "clusters": result.n_clusters},
            outputs=describe_outputs(run_dir, [ldir / "final.json"]) + list(step_outputs),
            extra={"final_step": result.step, "inertia": result.inertia, "level_hash": h},
        ),
    )


def _finished(run_dir: Path, level: int, h: str) -> LevelResult | None:
    """The level's result if ``final.json`` and its step's marker are valid."""
    final = read_final(run_dir, level)
    if final is None:
        return None
    if final.get("config_hash") != h:
        raise ConfigMismatchError(
            f"{level_dir(run_dir, level)}/final.json was written with config hash "
            f"{str(final.get('config_hash'))[:12]}, but this run's level {level} hashes to "
            f"{h[:12]}: the run dir belongs to a different configuration. Use a new run name "
            "or delete the run dir."
        )
    if check_marker(run_dir, stage_dir(level, final["step"]), 0, h) is None:
        return None
    keys = {f for f in LevelResult.__dataclass_fields__ if f != "skipped"}
    return LevelResult(**{k: v for k, v in final.items() if k in keys})


def _run_step(
    run_dir: Path,
    level: int,
    s: int,
    params: HierarchyParams,
    data: np.ndarray,
    h: str,
    dev: torch.device,
    comm: Comm,
    out_dtype: np.dtype,
    k: int,
) -> dict:
    step = f"step{s}"
    marker = check_marker(run_dir, stage_dir(level, step), 0, h)
    if _all_done(comm, marker is not None):
        log.info("k-means level %d %s is complete, skipping", level, step)
        return {"step": step, "skipped": True, **marker.extra}
    started = time.time()
    kp = params.kmeans_params(level)
    everything = PointSet(data)
    sample = None
    if s == 0:
        points = everything
    else:
        prev = StepOutputs(level_dir(run_dir, level) / f"step{s - 1}")
        offsets, members = prev.members()
        sample = resample_points(
            offsets,
            members,
            int(params.sample_size[level - 1]),
            params.sampling_strategy,
            make_rng(params.seed, level, s, _SAMPLE),
        )
        if len(sample) < k:
            raise ConfigError(
                f"level {level} step {s}: the sample has {len(sample)} points, fewer than "
                f"n_clusters={k} (sample_size={params.sample_size[level - 1]} per cluster); "
                f"raise kmeans.sample_size[{level - 1}]"
            )
        points = PointSet(data, sample)
    res = kmeans(points, kp, device=dev, comm=comm, rng=make_rng(params.seed, level, s, _INIT))
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
    a_all = _gather_to_root(comm, assignment)
    d_all = _gather_to_root(comm, sq)
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
        _publish_step(
            run_dir,
            level,
            step,
            h,
            res.centroids,
            a_all,
            d_all,
            out_dtype,
            params.save_distances,
            sample,
            extra,
            started,
        )
    comm.barrier()
    log.info("k-means level %d %s: k=%d, inertia %.6g", level, step, k, inertia)
    return {"step": step, "skipped": False, **extra}


def _run_split(
    run_dir: Path,
    level: int,
    params: HierarchyParams,
    data: np.ndarray,
    h: str,
    dev: torch.device,
    comm: Comm,
    out_dtype: np.dtype,
) -> dict:
    """Split each cluster of step 0 into min(n_splits, size) clusters (pre-clusters are
    shared out to ranks in contiguous ranges; each is solved by one rank alone)."""
    step = "split"
    marker = check_marker(run_dir, stage_dir(level, step), 0, h)
    if _all_done(comm, marker is not None):
        return {"step": step, "skipped": True, **marker.extra}
    started = time.time()
    n_splits = int(params.n_splits[level - 1])
    offsets, members = StepOutputs(level_dir(run_dir, level) / "step0").members()
    n_pre = len(offsets) - 1
    lo, hi = contiguous_range(n_pre, comm.rank, comm.world)
    cents, pts, labels, dists = [], [], [], []
    for c in range(lo, hi):
        idx = np.sort(np.asarray(members[offsets[c] : offsets[c + 1]]))
        if len(idx) == 0:
            continue
        kc = min(n_splits, len(idx))
        kp = params.kmeans_params(level, n_clusters=kc)
        res = kmeans(
            PointSet(data, idx),
            kp,
            device=dev,
            comm=Comm.solo(),
            rng=make_rng(params.seed, level, _SPLIT_STEP + c, _SPLIT),
        )
        used, local = np.unique(res.assignment, return_inverse=True)  # drop empty sub-clusters
        base = sum(len(x) for x in cents)
        cents.append(res.centroids[used])
        pts.append(idx)
        labels.append(local.astype(np.int64) + base)
        dists.append(res.sq_distances)
    dim = data.shape[1]
    my_c = np.concatenate(cents) if cents else np.empty((0, dim))
    my_p = np.concatenate(pts) if pts else np.empty(0, dtype=np.int64)
    my_l = np.concatenate(labels) if labels else np.empty(0, dtype=np.int64)
    my_d = np.concatenate(dists) if dists else np.empty(0)
    counts = _gather_to_root(comm, np.array([len(my_c)], dtype=np.int64))
    all_c = _gather_to_root(comm, my_c.astype(np.float64))
    label_counts = _gather_to_root(comm, np.array([len(my_l)], dtype=np.int64))
    all_p = _gather_to_root(comm, my_p)
    all_l = _gather_to_root(comm, my_l)
    all_d = _gather_to_root(comm, my_d.astype(np.float64))
    inertia = float(comm.sum_(torch.tensor([float(my_d.sum())], dtype=torch.float64)).item())
    extra = {
        "kind": "split",
        "inertia": inertia,
        "n_splits": n_splits,
        "pre_clusters": n_pre,
        "world_size": comm.world,
        "device": str(dev),
    }
    if comm.is_root:
        # Local labels count from 0 on each rank: shift by the centroids of earlier ranks.
        shift = np.repeat(np.cumsum(counts) - counts, label_counts)
        n = data.shape[0]
        assignment = np.full(n, -1, dtype=np.int64)
        sq = np.zeros(n, dtype=np.float64)
        assignment[all_p] = all_l + shift
        sq[all_p] = all_d
        if (assignment < 0).any():  # pragma: no cover - every point is in one pre-cluster
            raise RuntimeError("split mode left points without a cluster")
        _publish_step(
            run_dir,
            level,
            step,
            h,
            all_c,
            assignment,
            sq,
            out_dtype,
            params.save_distances,
            None,
            extra,
            started,
        )
    comm.barrier()
    total = comm.sum_(torch.tensor([len(my_c)], dtype=torch.int64))
    log.info(
        "k-means level %d split: %d pre-clusters -> %d clusters", level, n_pre, int(total.item())
    )
    return {"step": step, "skipped": False, **extra}


def run_hierarchy(
    run_dir: str | Path,
    params: HierarchyParams,
    embeddings_path: str | Path,
    *,
    device: torch.device | str = "cpu",
    comm: Comm | None = None,
    config_hash: str = "",
) -> list[LevelResult]:
    """Run levels 1..n_levels in this process (the pipeline runs one job per level)."""
    return [
        run_level(
            run_dir,
            level,
            params,
            embeddings_path=embeddings_path,
            device=device,
            comm=comm,
            config_hash=config_hash,
        )
        for level in range(1, params.n_levels + 1)
    ]
