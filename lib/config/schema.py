"""The configuration schema: every stage's parameter dataclass, composed into one root.

Every YAML file under ``conf/`` is merged onto these dataclasses, so a misspelt key or a
value of the wrong type fails at startup with the key's full path (``launch.py`` adds the
list of valid keys) before anything is submitted. Jobs re-read the resolved ``run.yaml``
through the same schema. The stage sections are defined in their stage packages
(``lib/<stage>/params.py``); the run and cluster sections here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from lib.config.fields import bounded
from lib.config.multihost import HostEntry, MultihostConfig, TpuVmConfig
from lib.curate.params import CurateParams
from lib.data.params import DatasetParams
from lib.embed.params import EmbedParams, ModelParams
from lib.extract.params import ExtractParams
from lib.index.params import IndexParams
from lib.kmeans.params import KmeansParams
from lib.merge.params import MergeParams
from lib.metrics.params import ClusteringParams, MetricsParams, TrackingParams
from lib.report.params import ReportParams
from lib.sync.params import SyncParams

SCHEMA_NAME = "embedfleet_schema"


class LauncherKind(StrEnum):
    local = "local"
    slurm = "slurm"
    submitit = "submitit"
    hosts = "hosts"
    tpu_vm = "tpu_vm"


@dataclass
class RunConfig:
    """Where the run lives: ``root/name``, a local path or an fsspec URL (``s3://bucket/
    runs``). ``dir`` is the run dir: ``root/name`` for a single run, one sub-dir per
    sweep point under ``-m``."""

    name: str = "default"
    root: str = "outputs"
    dir: str = "${ef.run_dir:${run.root},${hydra:runtime.output_dir}}"
    seed: int = bounded(0, ge=0)


@dataclass
class SlurmResources:
    """sbatch resources of one stage. null = not rendered (the cluster's default)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # e.g. "02:00:00" or "1-00:00:00"
    nodes: int | None = bounded(None, ge=1)
    ntasks_per_node: int | None = bounded(None, ge=1)
    gpus_per_node: int | None = bounded(None, ge=0)
    cpus_per_task: int | None = bounded(None, ge=1)
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
    sync: SlurmResources = field(default_factory=SlurmResources)
    merge: SlurmResources = field(default_factory=SlurmResources)
    kmeans: SlurmResources = field(default_factory=SlurmResources)
    metrics: SlurmResources = field(default_factory=SlurmResources)
    curate: SlurmResources = field(default_factory=SlurmResources)
    index: SlurmResources = field(default_factory=SlurmResources)
    report: SlurmResources = field(default_factory=SlurmResources)
    extract: SlurmResources = field(default_factory=SlurmResources)


@dataclass
class SlurmConfig:
    job_name_prefix: str = "ef"
    # --array=...%N: tasks of one array running at once
    array_throttle: int | None = bounded(None, ge=1)
    # null: read MaxArraySize from `scontrol show config`
    max_array_size: int | None = bounded(None, ge=1)
    signal: str = "USR2"  # sent before the time limit: stop at a safe point, requeue
    signal_delay_s: int = bounded(120, ge=0)
    requeue: bool = True
    max_restarts: int = bounded(3, ge=0)  # a task restarted more often (SLURM_RESTART_COUNT) fails
    resources: StageResources = field(default_factory=StageResources)


@dataclass
class ClusterConfig:
    launcher: LauncherKind = LauncherKind.local
    parallelism: int = bounded(2, ge=1)  # local: tasks run at once
    # local: >0 runs one task per GPU with CUDA_VISIBLE_DEVICES set
    num_gpus: int = bounded(0, ge=0)
    # More ranks of a distributed stage than GPUs: false refuses (each rank gets its own
    # GPU), true wraps them round, several ranks per GPU (each must fit in its share).
    share_gpus: bool = False
    # Interpreter for task commands on the cluster; null: the one running launch.py.
    python: str | None = None
    # Where tasks put memory-mapped scratch files (k-means, metrics) and, for a run dir on
    # an object store, staged uploads and cached downloads. Expanded on the compute node,
    # so "$LSCRATCH" means the node-local scratch there.
    scratch_dir: str = "$TMPDIR"
    # Variables set for every task. Not for secrets (run.yaml keeps those redacted, and
    # only cluster=local accepts one here): use pass_env or env_file.
    env: dict[str, str] = field(default_factory=dict)
    # Names of variables forwarded from the launching environment to the tasks (sbatch
    # --export), never written: e.g. [WANDB_API_KEY, HF_TOKEN]. A retry forwards them again.
    pass_env: list[str] = field(default_factory=list)
    # A shell file the tasks source before they start (e.g. ~/.wandb_api_key.sh holding
    # `export WANDB_API_KEY=...`): its path is in the scripts, its content nowhere.
    env_file: str | None = None
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    # cluster=hosts: the SSH machines; cluster=tpu_vm: the TPU; both: cluster.multihost.
    hosts: list[HostEntry] = field(default_factory=list)
    tpu_vm: TpuVmConfig = field(default_factory=TpuVmConfig)
    multihost: MultihostConfig = field(default_factory=MultihostConfig)


@dataclass
class EmbedfleetConfig:
    run: RunConfig = field(default_factory=RunConfig)
    dataset: DatasetParams = field(default_factory=DatasetParams)
    model: ModelParams = field(default_factory=ModelParams)
    embed: EmbedParams = field(default_factory=EmbedParams)
    sync: SyncParams = field(default_factory=SyncParams)
    merge: MergeParams = field(default_factory=MergeParams)
    kmeans: KmeansParams = field(default_factory=KmeansParams)
    curate: CurateParams = field(default_factory=CurateParams)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    metrics: MetricsParams = field(default_factory=MetricsParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    clustering: ClusteringParams = field(default_factory=ClusteringParams)
    index: IndexParams = field(default_factory=IndexParams)
    report: ReportParams = field(default_factory=ReportParams)
    extract: ExtractParams = field(default_factory=ExtractParams)
    stages: list[str] = field(default_factory=lambda: ["embed", "merge"])
    description: str = ""
