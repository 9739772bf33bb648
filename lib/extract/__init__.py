"""The extract stage: hidden states of chosen layers of a causal LM over a dataset, saved
as size-capped, optionally zstd-compressed safetensors shards (local, ``gs://``, ``s3://``).

``params`` (the ``extract`` node), ``plan`` (one array task per contiguous slice of
samples, then one task merging their metadata), ``forward`` (the backend's forward pass:
``model``, torch: load a causal LM, run it only up to the last requested layer, capture
layers with forward hooks; ``jax_model`` + ``jax_forward``, jax: a Llama/Qwen2 decoder in
plain JAX, jit-compiled once, sharded over the local ``mesh``), ``samples`` (rows ->
token sequences: truncate or pack), ``shardfile`` (the shard format: safetensors, zstd,
byte-shuffle), ``writer`` (size-capped shards written by a thread), ``task`` (what the
jobs run), ``reader`` (``ActivationReader``), ``summary``. Imports the shared layers, never
another stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lib.extract.reader import ActivationReader

__all__ = ["ActivationReader"]


def __getattr__(name: str) -> Any:
    # Lazy: the schema imports lib.extract.params, which must not pull in torch.
    if name == "ActivationReader":
        from lib.extract.reader import ActivationReader

        return ActivationReader
    raise AttributeError(name)
