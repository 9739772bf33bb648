"""The ``hf`` backend: sentence-transformers (or plain transformers) run by us.

We reuse the token ids of the length filter, build length-sorted batches under a token
budget (little padding, larger batches for short rows), and call the model's own module
chain (``SentenceTransformer.forward``) so its pooling, dense layers and normalization
apply exactly as configured in its ``modules.json``. Plain transformers checkpoints need
``model.pooling`` set. ``torch.inference_mode``; bf16 on GPU, fp32 on CPU; on CUDA
out-of-memory the batch is halved and retried, and the log says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from lib.compute.devices import pick_dtype, resolve_device
from lib.compute.models import force_offline, resolve_model_path
from lib.core.errors import ModelError
from lib.embed.params import Pooling

log = logging.getLogger(__name__)


def quiet_transformers() -> None:
    """No weight-loading progress bars in task logs (our own progress says enough)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_warning()
    except ImportError:
        pass


def length_sorted_batches(
    lengths: list[int], max_rows: int, max_tokens: int
) -> Iterator[list[int]]:
    """Index batches, longest rows first, each within ``max_rows`` and ``max_tokens`` padded.

    Longest first so that a batch that does not fit in memory fails at the start.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batch: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i])
        if batch and (len(batch) + 1 > max_rows or (len(batch) + 1) * w > max_tokens):
            yield batch
            batch, w = [], lengths[i]
        batch.append(i)
        width = w
    if batch:
        yield batch


def pool(
    token_embeddings: torch.Tensor, attention_mask: torch.Tensor, mode: Pooling
) -> torch.Tensor:
    """Pool (B, T, D) token states into (B, D) with ``mode`` (mean / cls / last token)."""
    mask = attention_mask.to(token_embeddings.dtype).unsqueeze(-1)
    if mode == Pooling.mean:
        return (token_embeddings * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if mode == Pooling.cls:
        return token_embeddings[:, 0]
    if mode == Pooling.last:
        # Works for left and right padding: the last position whose mask is 1.
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask * positions).argmax(dim=1)
        return token_embeddings[torch.arange(token_embeddings.shape[0]), last]
    raise ValueError(f"unsupported pooling {mode}")


@dataclass
class HFEmbedder:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    dim: int
    pooling: Pooling  # auto: the sentence-transformers module chain decides
    normalize: bool | None
    dimensions: int | None
    batch_size: int
    max_tokens: int
    is_sentence_transformer: bool
    description: str = ""

    @classmethod
    def from_config(cls, model_cfg: DictConfig, embed_cfg: DictConfig) -> HFEmbedder:
        force_offline()
        quiet_transformers()
        path = resolve_model_path(model_cfg.path)
        device = resolve_device(embed_cfg.device, key="embed.device")
        dtype = pick_dtype(model_cfg.dtype, device)
        if embed_cfg.torch_threads:
            torch.set_num_threads(int(embed_cfg.torch_threads))
        pooling = Pooling(model_cfg.pooling)
        is_st = (Path(path) / "modules.json").exists()
        try:
            if is_st:
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(
                    str(path), device=str(device), trust_remote_code=model_cfg.trust_remote_code
                )
                tokenizer = model.tokenizer
                getter = (
                    getattr(model, "get_embedding_dimension", None)
                    or model.get_sentence_embedding_dimension
                )
                dim = getter()
            else:
                if pooling == Pooling.auto:
                    raise ModelError(
                        f"model {path} has no sentence-transformers config (modules.json), so its "
                        "pooling is unknown: set model.pooling=mean|cls|last (and model.normalize)"
                    )
                from transformers import AutoModel, AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(
                    str(path), trust_remote_code=model_cfg.trust_remote_code
                )
                model = AutoModel.from_pretrained(
                    str(path), trust_remote_code=model_cfg.trust_remote_code
                ).to(device)
                dim = int(model.config.hidden_size)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"model {path} could not be loaded with transformers: {exc}") from exc
        if getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token  # decoder-only models ship without one
        model = model.to(dtype).eval()
        dims = model_cfg.dimensions
        if dims is not None and not 0 < dims <= dim:
            raise ModelError(f"model.dimensions={dims} must be in 1..{dim} for this model")
        return cls(
            model=model,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            dim=int(dims or dim),
            pooling=pooling,
            normalize=model_cfg.normalize,
            dimensions=dims,
            batch_size=int(embed_cfg.batch_size),
            max_tokens=int(embed_cfg.max_tokens_per_batch),
            is_sentence_transformer=is_st,
            description=f"hf:{model_cfg.name} on {device} ({str(dtype).removeprefix('torch.')})",
        )

    def _forward(self, ids: list[list[int]]) -> torch.Tensor:
        batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        features = {k: v.to(self.device) for k, v in batch.items()}
        if self.is_sentence_transformer:
            out = self.model.forward(features)
            if self.pooling == Pooling.auto:
                emb = out["sentence_embedding"]
            else:
                emb = pool(out["token_embeddings"], features["attention_mask"], self.pooling)
        else:
            hidden = self.model(**features).last_hidden_state
            emb = pool(hidden, features["attention_mask"], self.pooling)
        emb = emb.float()
        if self.dimensions is not None:
            emb = emb[:, : self.dimensions]
        if self.normalize or (self.normalize is None and self._st_normalizes()):
            emb = torch.nn.functional.normalize(emb, p=2, dim=1)
        return emb

    def _st_normalizes(self) -> bool:
        if not self.is_sentence_transformer:
            return False
        # Re-normalising after Matryoshka truncation or a pooling override keeps the model's
        # contract (unit vectors) when its chain ends in Normalize.
        return (self.dimensions is not None or self.pooling != Pooling.auto) and any(
            type(m).__name__ == "Normalize" for m in self.model
        )

    def _embed_batch(self, ids: list[list[int]]) -> torch.Tensor:
        try:
            return self._forward(ids)
        except torch.OutOfMemoryError:
            if len(ids) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(ids) // 2
            self.max_tokens = max(1, self.max_tokens // 2)
            log.warning(
                "CUDA out of memory on a batch of %d rows (longest %d tokens): halving the "
                "batch and retrying; token budget is now %d",
                len(ids),
                max(len(x) for x in ids),
                self.max_tokens,
            )
            return torch.cat([self._embed_batch(ids[:half]), self._embed_batch(ids[half:])])

    def embed(
        self, token_ids: list[list[int]], on_batch: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Embeddings (n, dim) float32 of ``token_ids``, in input order."""
        out = np.empty((len(token_ids), self.dim), dtype=np.float32)
        lengths = [len(t) for t in token_ids]
        with torch.inference_mode():
            for idx in length_sorted_batches(lengths, self.batch_size, self.max_tokens):
                emb = self._embed_batch([token_ids[i] for i in idx])
                out[idx] = emb.cpu().numpy()
                if on_batch:
                    on_batch(len(idx))
        return out
