"""Embedding backends behind one small interface.

A backend is built from the model and embed configs and offers:

- ``tokenizer``: the model's Hugging Face tokenizer (the shard's length filter uses it);
- ``dim``: output dimension;
- ``embed(token_ids, on_batch)``: float32 array (n, dim) in input order, from token ids
  already produced by the length filter (no second tokenization).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
from omegaconf import DictConfig

from lib.embed.params import Backend


class Embedder(Protocol):
    tokenizer: object
    dim: int
    description: str

    def embed(
        self, token_ids: list[list[int]], on_batch: Callable[[int], None] | None = None
    ) -> np.ndarray: ...


def load_embedder(model_cfg: DictConfig, embed_cfg: DictConfig) -> Embedder:
    """Instantiate the configured backend (``embed.backend``)."""
    backend = Backend(embed_cfg.backend)
    if backend == Backend.hf:
        from lib.embed.backends.hf import HFEmbedder

        return HFEmbedder.from_config(model_cfg, embed_cfg)
    if backend == Backend.vllm:
        from lib.embed.backends.vllm import VllmEmbedder

        return VllmEmbedder.from_config(model_cfg, embed_cfg)
    raise ValueError(f"unknown backend {backend}")
