"""Search queries embedded as the run embedded its documents: the run's model, pooling,
normalization and dimensions (the ``hf`` backend, ``lib.embed.backends.hf``), with the
model's query prompt in front.

The prompt (``query_prompt``): ``model.query_prompt`` when set; else the model's own
sentence-transformers ``prompts["query"]`` (``config_sentence_transformers.json``: Qwen3-
Embedding's ``Instruct: ...\\nQuery:``); else ``model.document_prefix``, so a symmetric
model embeds a query exactly as it embedded a document of the same text. A query longer
than ``model.max_length`` tokens is cut to it (documents that long were dropped; a query
is not data), and the caller is told how many were cut.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lib.compute.models import resolve_model_path
from lib.core.errors import ModelError
from lib.embed.params import Backend


def model_query_prompt(model_dir: Path) -> str | None:
    """The ``query`` prompt of a sentence-transformers model directory; None if it has
    none. Raises ``ModelError`` for an unreadable config."""
    path = Path(model_dir) / "config_sentence_transformers.json"
    if not path.exists():
        return None
    try:
        prompts = json.loads(path.read_text()).get("prompts") or {}
    except (ValueError, AttributeError) as exc:
        raise ModelError(f"{path}: not a sentence-transformers config ({exc})") from None
    prompt = prompts.get("query") if isinstance(prompts, dict) else None
    return str(prompt) if prompt else None


def query_prompt(model_cfg: DictConfig, model_dir: Path) -> str:
    """What goes in front of every query (see the module doc)."""
    if model_cfg.get("query_prompt") is not None:
        return str(model_cfg.query_prompt)
    own = model_query_prompt(model_dir)
    return own if own is not None else str(model_cfg.document_prefix or "")


@dataclass
class QueryEmbedding:
    vectors: np.ndarray  # (n, dim) float32
    truncated: int  # queries cut to model.max_length tokens
    prompt: str


class QueryEmbedder:
    """The run's model, loaded once, for embedding queries."""

    def __init__(self, model_cfg: DictConfig, embed_cfg: DictConfig, device: str = "auto") -> None:
        from lib.embed.backends.hf import HFEmbedder

        model_dir = resolve_model_path(model_cfg.path)
        self.prompt = query_prompt(model_cfg, model_dir)
        self.max_length = int(model_cfg.max_length)
        embed = OmegaConf.to_container(embed_cfg, resolve=True)
        embed.update(backend=Backend.hf.value, device=device)
        self.embedder = HFEmbedder.from_config(model_cfg, OmegaConf.create(embed))
        self.dim = int(self.embedder.dim)

    def embed(self, texts: list[str]) -> QueryEmbedding:
        """Embeddings of ``prompt + text`` for each of ``texts``, in order."""
        tokenizer = self.embedder.tokenizer
        ids = tokenizer(
            [self.prompt + t for t in texts],
            add_special_tokens=True,
            truncation=False,
            padding=False,
            return_attention_mask=False,
        )["input_ids"]
        long = [n for n, i in enumerate(ids) if len(i) > self.max_length]
        if long:  # the tokenizer cuts them keeping its special tokens ([SEP], EOS)
            cut = tokenizer(
                [self.prompt + texts[n] for n in long],
                add_special_tokens=True,
                truncation=True,
                max_length=self.max_length,
                padding=False,
                return_attention_mask=False,
            )["input_ids"]
            for n, i in zip(long, cut, strict=True):
                ids[n] = i
        truncated = len(long)
        vectors = self.embedder.embed(ids)
        return QueryEmbedding(np.asarray(vectors, dtype=np.float32), truncated, self.prompt)
