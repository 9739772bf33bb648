"""Every name inside a run dir, in one place: no other module formats a run-dir path.

A run dir (``run.root/run.name``, a local path or an fsspec URL) holds::

    run.yaml  plan.json                      the resolved config (redacted), the stage plan
    launcher.lock                            who is launching the run (lib.core.locks)
    scheduler.json scheduler.log             the hosts launcher's scheduler: who, state; its log
    <stage dir>/completions/task_XXXXX.json  completion markers (DESIGN.md contract 2)
    <stage dir>/completions/invalid/         markers whose outputs no longer matched, with why
    <stage dir>/attempts/task_XXXXX.json     who ran a task last (local launcher)
    <stage dir>/attempts/task_XXXXX.lock     held while the task runs (local path run dirs)
    <stage dir>/logs/task_XXXXX[.rankR].log  task logs
    embed/shards/shard_XXXXX.{safetensors,parquet,dropped.parquet}
    embed/parts/shard_XXXXX/part_YYYYY.*     finished parts of an unfinished shard
    sync/<source>/...                        files synced from a remote source (subdirs kept)
    sync/records/task_XXXXX.json sync/slots/ what each source's last sync saw; run slots
    merge/embeddings.{safetensors,npy} metadata.parquet dropped_rows.parquet
          quality_report.json by_source/<source>/ by_source/index.json
    kmeans/level{L}/step{s}|split/           centroids, assignment, members, ... (+ markers)
    kmeans/level{L}/final.json               the level's summary
    kmeans/curated/                          the curated subset
    metrics/level{L}/                        metrics.json, per_cluster.parquet, examples.json
    index/index.faiss ids.parquet params.json  the faiss index, its id map, search settings
    extract/task_XXXXX/shard_YYYYY.safetensors[.zst]  activation shards of one task
    extract/task_XXXXX/shard_YYYYY.json      a finished shard's checkpoint marker
    extract/task_XXXXX/metadata.json         the task's model, layers, samples, shards
    extract/metadata.json                    totals over all tasks (stage extract_metadata)
    report/index.html                        the run's report page (self-contained HTML)
    slurm/<stage>-NNN.sbatch slurm/submissions.json submitit/<stage>/

Stage dirs: ``embed``, ``merge``, ``kmeans/level{L}`` (stage ``kmeans_level{L}``),
``kmeans/curated`` (stage ``curate``), ``metrics/level{L}`` (stage ``metrics_level{L}``),
``index``, ``report``.
Names are relative POSIX strings; ``RunPaths.storage`` reads and writes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lib.core.errors import ConfigError
from lib.core.storage import Storage, open_storage

RUN_CONFIG = "run.yaml"
PLAN = "plan.json"
LAUNCHER_LOCK = "launcher.lock"
SCHEDULER = "scheduler.json"
SCHEDULER_LOG = "scheduler.log"

EMBED_DIR = "embed"
MERGE_DIR = "merge"
SYNC_DIR = "sync"
KMEANS_DIR = "kmeans"
CURATED_DIR = f"{KMEANS_DIR}/curated"
METRICS_DIR = "metrics"
INDEX_DIR = "index"
EXTRACT_DIR = "extract"
EXTRACT_MERGED_DIR = f"{EXTRACT_DIR}/merged"
REPORT_DIR = "report"
SLURM_DIR = "slurm"
SUBMITIT_DIR = "submitit"

EMBED_STAGE, MERGE_STAGE, CURATE_STAGE = "embed", "merge", "curate"
INDEX_STAGE = "index"
EXTRACT_STAGE, EXTRACT_METADATA_STAGE = "extract", "extract_metadata"
REPORT_STAGE = "report"
SYNC_STAGE = "sync"
KMEANS_LEVEL_PREFIX = "kmeans_level"
METRICS_LEVEL_PREFIX = "metrics_level"
MERGE_EMBEDDINGS = {"safetensors": "embeddings.safetensors", "npy": "embeddings.npy"}
METRICS_FILES = ("metrics.json", "per_cluster.parquet", "examples.json")


# printf-style, so that a shell that knows the task index (an sbatch array script) can
# form the same names.
TASK_FORMAT = "task_%05d"


def task_name(task: int) -> str:
    return TASK_FORMAT % task


def kmeans_level_stage(level: int) -> str:
    """The stage name of k-means level ``level``: ``kmeans_level2``."""
    return f"{KMEANS_LEVEL_PREFIX}{level}"


def metrics_level_stage(level: int) -> str:
    return f"{METRICS_LEVEL_PREFIX}{level}"


def level_of(stage: str, prefix: str = KMEANS_LEVEL_PREFIX) -> int:
    """``kmeans_level3`` -> 3. Raises ``ConfigError`` for another name."""
    m = re.fullmatch(rf"{prefix}(\d+)", stage)
    if not m:
        raise ConfigError(f"stage {stage!r} is not a level stage (expected {prefix}<L>)")
    return int(m.group(1))


def is_level_stage(stage: str, prefix: str = KMEANS_LEVEL_PREFIX) -> bool:
    return re.fullmatch(rf"{prefix}\d+", stage) is not None


def kmeans_level_dir(level: int) -> str:
    return f"{KMEANS_DIR}/level{level}"


def metrics_level_dir(level: int, root: str = METRICS_DIR) -> str:
    return f"{root}/level{level}" if root else f"level{level}"


def step_name(step: int) -> str:
    return f"step{step}"


def sidecar(name: str) -> str:
    """The JSON sidecar that states an array file's shape and dtype."""
    return f"{name}.json"


@dataclass(frozen=True)
class ShardFiles:
    """The files of one embed shard (or of one part of it)."""

    embeddings: str
    metadata: str
    dropped: str

    @classmethod
    def at(cls, base: str) -> ShardFiles:
        return cls(f"{base}.safetensors", f"{base}.parquet", f"{base}.dropped.parquet")

    def all(self) -> list[str]:
        return [self.embeddings, self.metadata, self.dropped]


@dataclass(frozen=True)
class StepFiles:
    """One k-means step's directory (``kmeans/level1/step2``) and its files."""

    dir: str

    def array(self, name: str) -> str:
        return f"{self.dir}/{name}.npy"


class RunPaths:
    """The names of one run dir, and the ``Storage`` that holds them."""

    def __init__(self, root: str | Path | Storage, scratch: Path | None = None) -> None:
        self.storage = root if isinstance(root, Storage) else open_storage(root, scratch)

    @property
    def root(self) -> str:
        return self.storage.root

    def __repr__(self) -> str:
        return f"RunPaths({self.root!r})"

    def url(self, name: str = "") -> str:
        return self.storage.url(name)

    run_config = RUN_CONFIG
    plan = PLAN
    # Held by the launcher that runs the run (lib.core.locks).
    launcher_lock = LAUNCHER_LOCK
    # The process that schedules a cluster=hosts|tpu_vm run's tasks (launchers.hosts):
    # host, pid, start, detached or not, how it ended; a detached one's output.
    scheduler = SCHEDULER
    scheduler_log = SCHEDULER_LOG

    # -- what every stage has (a k-means step dir, too: its marker is in the step dir) ------
    @staticmethod
    def marker(stage_dir: str, task: int) -> str:
        return f"{stage_dir}/completions/{task_name(task)}.json"

    @staticmethod
    def invalid_marker(name: str, stamp: str) -> str:
        """Where the marker ``name`` goes when its outputs no longer match it: beside it,
        under ``invalid/`` (``<stage dir>/completions/invalid/task_00000.<stamp>.json``)."""
        head, _, base = name.rpartition("/")
        moved = f"invalid/{base.removesuffix('.json')}.{stamp}.json"
        return f"{head}/{moved}" if head else moved

    @staticmethod
    def is_marker(name: str) -> bool:
        """Whether ``name`` is a live task or checkpoint marker: ``.../completions/
        task_XXXXX.json`` (tasks, k-means steps) or ``embed/parts/shard_X/part_Y.json``."""
        return (
            re.fullmatch(r"(.+/)?completions/task_\d+\.json", name) is not None
            or re.fullmatch(rf"{EMBED_DIR}/parts/shard_\d+/part_\d+\.json", name) is not None
        )

    @staticmethod
    def attempt(stage_dir: str, task: int) -> str:
        return f"{stage_dir}/attempts/{task_name(task)}.json"

    @staticmethod
    def task_lock(stage_dir: str, task: int, rank: int = 0) -> str:
        """Held by the process running the task (rank) while it runs (lib.core.locks)."""
        suffix = f".rank{rank}" if rank else ""
        return f"{stage_dir}/attempts/{task_name(task)}{suffix}.lock"

    @staticmethod
    def remote_proc(stage_dir: str, task: int, rank: int, attempt: int, kind: str) -> str:
        """A remote task process's record (launchers.hosts): ``kind`` ``pid`` (its process
        group, written by the process itself) or ``exit`` (its exit code, written as it
        ends); one pair per attempt, so a retry never reads an earlier attempt's code."""
        return f"{stage_dir}/attempts/{task_name(task)}.rank{rank}.a{attempt}.{kind}"

    @staticmethod
    def logs(stage_dir: str) -> str:
        return f"{stage_dir}/logs"

    @staticmethod
    def log(stage_dir: str, task: int, rank: int | str | None = None) -> str:
        """A task's log; distributed stages have one per rank (``task_00000.rank3.log``;
        ``rank="%t"`` gives srun's ``--output`` pattern of them)."""
        suffix = f".rank{rank}" if rank is not None else ""
        return f"{stage_dir}/logs/{task_name(task)}{suffix}.log"

    @staticmethod
    def log_file_format() -> str:
        """A task's log file name with a printf slot for the task index."""
        return f"{TASK_FORMAT}.log"

    # -- embed ------------------------------------------------------------------------------
    @staticmethod
    def embed_shards() -> str:
        return f"{EMBED_DIR}/shards"

    @staticmethod
    def embed_sample() -> str:
        """The dataset rows a sampled run embeds (``dataset.per_source``/``sources``)."""
        return f"{EMBED_DIR}/sample.parquet"

    @staticmethod
    def embed_shard(task: int) -> ShardFiles:
        return ShardFiles.at(f"{EMBED_DIR}/shards/shard_{task:05d}")

    @staticmethod
    def embed_shard_prefix(task: int) -> str:
        """What the names of shard ``task``'s files (and their temporaries) start with."""
        return f"{EMBED_DIR}/shards/shard_{task:05d}."

    @staticmethod
    def embed_parts(task: int) -> str:
        return f"{EMBED_DIR}/parts/shard_{task:05d}"

    @staticmethod
    def part_name(part: int) -> str:
        return f"part_{part:05d}"

    @staticmethod
    def embed_part(task: int, part: int) -> ShardFiles:
        return ShardFiles.at(f"{RunPaths.embed_parts(task)}/{RunPaths.part_name(part)}")

    @staticmethod
    def embed_part_marker(task: int, part: int) -> str:
        return f"{RunPaths.embed_parts(task)}/{RunPaths.part_name(part)}.json"

    # -- sync -------------------------------------------------------------------------------
    @staticmethod
    def sync_source(source: str) -> str:
        """Where the files of remote source ``source`` land: ``sync/<source>``."""
        return f"{SYNC_DIR}/{source}"

    @staticmethod
    def sync_record(task: int) -> str:
        """What the last sync of source ``task`` saw and verified, file by file, rewritten
        as each file completes (a killed task's next attempt starts from it):
        ``sync/records/task_XXXXX.json``."""
        return f"{SYNC_DIR}/records/{task_name(task)}.json"

    @staticmethod
    def sync_slot(slot: int) -> str:
        """A lock file a sync task holds while it runs (``sync.parallel_sources`` slots)."""
        return f"{SYNC_DIR}/slots/slot_{slot:03d}.lock"

    # -- merge ------------------------------------------------------------------------------
    @staticmethod
    def merge_embeddings(fmt: str = "safetensors") -> str:
        return f"{MERGE_DIR}/{MERGE_EMBEDDINGS[fmt]}"

    merge_metadata = f"{MERGE_DIR}/metadata.parquet"
    merge_dropped = f"{MERGE_DIR}/dropped_rows.parquet"
    merge_report = f"{MERGE_DIR}/quality_report.json"
    merge_by_source = f"{MERGE_DIR}/by_source"
    merge_by_source_index = f"{MERGE_DIR}/by_source/index.json"

    @staticmethod
    def merge_source_file(dir_name: str, file_name: str) -> str:
        """A file of one source's split: ``merge/by_source/<dir_name>/<file_name>``."""
        return f"{MERGE_DIR}/by_source/{dir_name}/{file_name}"

    # -- kmeans -----------------------------------------------------------------------------
    kmeans = KMEANS_DIR

    @staticmethod
    def kmeans_level(level: int) -> str:
        return kmeans_level_dir(level)

    @staticmethod
    def kmeans_step(level: int, step: str) -> StepFiles:
        """``step`` is ``step{s}`` or ``split``."""
        return StepFiles(f"{kmeans_level_dir(level)}/{step}")

    @staticmethod
    def kmeans_level_of_marker(name: str) -> int | None:
        """The level whose completion marker ``name`` is (``kmeans/level2/completions/
        task_00000.json`` -> 2), else None."""
        m = re.fullmatch(rf"{KMEANS_DIR}/level(\d+)/completions/{task_name(0)}\.json", name)
        return int(m.group(1)) if m else None

    @staticmethod
    def kmeans_final(level: int) -> str:
        return f"{kmeans_level_dir(level)}/final.json"

    curated = CURATED_DIR

    @staticmethod
    def curated_file(name: str) -> str:
        return f"{CURATED_DIR}/{name}"

    # -- metrics ----------------------------------------------------------------------------
    @staticmethod
    def metrics_level(level: int, root: str = METRICS_DIR) -> str:
        return metrics_level_dir(level, root)

    @staticmethod
    def metrics_file(level: int, name: str, root: str = METRICS_DIR) -> str:
        return f"{metrics_level_dir(level, root)}/{name}"

    # -- index ------------------------------------------------------------------------------
    index = INDEX_DIR
    index_file = f"{INDEX_DIR}/index.faiss"
    index_ids = f"{INDEX_DIR}/ids.parquet"
    index_params = f"{INDEX_DIR}/params.json"

    # -- report -----------------------------------------------------------------------------
    report = REPORT_DIR
    report_page = f"{REPORT_DIR}/index.html"

    # -- extract ----------------------------------------------------------------------------
    @staticmethod
    def extract_task_dir(task: int) -> str:
        return f"{EXTRACT_DIR}/{task_name(task)}"

    @staticmethod
    def extract_shard(task: int, shard: int, compressed: bool) -> str:
        """``extract/task_XXXXX/shard_YYYYY.safetensors`` (``.zst`` when compressed)."""
        suffix = ".safetensors.zst" if compressed else ".safetensors"
        return f"{EXTRACT_DIR}/{task_name(task)}/shard_{shard:05d}{suffix}"

    @staticmethod
    def extract_shard_marker(task: int, shard: int) -> str:
        """The checkpoint marker of a finished shard (written after it, create-only)."""
        return f"{EXTRACT_DIR}/{task_name(task)}/shard_{shard:05d}.json"

    @staticmethod
    def extract_task_metadata(task: int) -> str:
        return f"{EXTRACT_DIR}/{task_name(task)}/metadata.json"

    extract_metadata = f"{EXTRACT_DIR}/metadata.json"

    # -- launchers --------------------------------------------------------------------------
    @staticmethod
    def slurm_script(stage: str, counter: int) -> str:
        return f"{SLURM_DIR}/{stage}-{counter:03d}.sbatch"

    slurm_submissions = f"{SLURM_DIR}/submissions.json"

    @staticmethod
    def submitit_folder(stage: str) -> str:
        return f"{SUBMITIT_DIR}/{stage}/%j"
