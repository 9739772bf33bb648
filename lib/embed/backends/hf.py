"""The ``hf`` backend: sentence-transformers (or plain transformers) run by us.

We reuse the token ids of the length filter, build length-sorted batches under a token
budget (little padding, larger batches for short rows), and call the model's own module
chain (``SentenceTransformer.forward``) so its pooling, dense layers and normalization
apply exactly as configured in its ``modules.json``. Plain transformers checkpoints need
``model.pooling`` set. ``torch.inference_mode``; weights loaded in the compute dtype
(bf16 on GPU, fp32 on CPU), pooling and normalization in fp32.

On CUDA out-of-memory (``torch.OutOfMemoryError``, or a cuBLAS/cuDNN allocation failure
raised as ``RuntimeError``) the token budget becomes half the failed batch's padded size,
the rows still to embed are re-batched under it, and the log says so once per halving; the
budget stays lowered for the task's later parts. The retry happens after the handler has
been left, so the failed forward's tensors (held by the traceback) can be freed first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from lib.compute.devices import free_device_memory, is_out_of_memory, pick_dtype, resolve_device
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
    """Pool (B, T, D) token states into (B, D) float32 with ``mode`` (mean / cls / last).

    In float32 whatever the model's dtype: a bf16 sum over hundreds of tokens keeps only
    ~3 significant digits."""
    token_embeddings = token_embeddings.float()
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

                # Loaded in the compute dtype: no fp32 copy of the weights first.
                model = SentenceTransformer(
                    str(path),
                    device=str(device),
                    trust_remote_code=model_cfg.trust_remote_code,
                    model_kwargs={"dtype": dtype},
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
                    str(path), trust_remote_code=model_cfg.trust_remote_code, dtype=dtype
                ).to(device)
                dim = int(model.config.hidden_size)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"model {path} could not be loaded with transformers: {exc}") from exc
        if getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token  # decoder-only models ship without one
        # The Transformer module was loaded in ``dtype``; later modules (Dense) follow here.
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
            out = self._st_forward(features)
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

    def _st_forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's module chain, with its Pooling (and what follows) fed float32 token
        states; a module with weights after it (Dense) gets its input in its own dtype."""
        for module in self.model:
            if type(module).__name__ == "Pooling" and "token_embeddings" in features:
                features["token_embeddings"] = features["token_embeddings"].float()
            elif "sentence_embedding" in features:
                weight = next(module.parameters(), None)
                if weight is not None:
                    features["sentence_embedding"] = features["sentence_embedding"].to(weight.dtype)
            features = module(features)
        return features

    def _st_normalizes(self) -> bool:
        if not self.is_sentence_transformer:
            return False
        # Re-normalising after Matryoshka truncation or a pooling override keeps the model's
        # contract (unit vectors) when its chain ends in Normalize.
        return (self.dimensions is not None or self.pooling != Pooling.auto) and any(
            type(m).__name__ == "Normalize" for m in self.model
        )

    def embed(
        self, token_ids: list[list[int]], on_batch: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Embeddings (n, dim) float32 of ``token_ids``, in input order.

        Raises ``ModelError`` when a single row does not fit in GPU memory."""
        out = np.empty((len(token_ids), self.dim), dtype=np.float32)
        lengths = [len(t) for t in token_ids]
        todo = list(range(len(token_ids)))
        with torch.inference_mode():
            while todo:
                done, failed = self._embed_rows(todo, token_ids, lengths, out, on_batch)
                if failed is None:
                    break
                # Outside the handler: the failed forward's tensors are unreachable now.
                free_device_memory(self.device)
                self._lower_budget(failed, lengths)
                finished = set(done)
                todo = [i for i in todo if i not in finished]
        return out

    def _embed_rows(
        self,
        todo: list[int],
        token_ids: list[list[int]],
        lengths: list[int],
        out: np.ndarray,
        on_batch: Callable[[int], None] | None,
    ) -> tuple[list[int], list[int] | None]:
        """Embed rows ``todo`` into ``out`` under the current budget. Returns the rows done
        and those of the batch that ran out of memory (None when all are done)."""
        done: list[int] = []
        for idx in length_sorted_batches(
            [lengths[i] for i in todo], self.batch_size, self.max_tokens
        ):
            rows = [todo[j] for j in idx]
            try:
                emb = self._forward([token_ids[i] for i in rows])
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                return done, rows
            out[rows] = emb.cpu().numpy()
            done.extend(rows)
            if on_batch:
                on_batch(len(rows))
        return done, None

    def _lower_budget(self, rows: list[int], lengths: list[int]) -> None:
        """Half the failed batch's padded tokens become the budget (logged once)."""
        longest = max(lengths[i] for i in rows)
        if len(rows) == 1:
            raise ModelError(
                f"{self.device} ran out of memory on a single row of {longest} tokens: lower "
                "model.max_length (longer rows are dropped and recorded), use a smaller "
                "model.dtype, or free the GPU of other processes"
            )
        padded = len(rows) * longest
        self.max_tokens = max(1, min(self.max_tokens, padded // 2))
        log.warning(
            "out of memory on %s with a batch of %d rows x %d tokens (%d padded): token "
            "budget is now %d (embed.max_tokens_per_batch); re-batching the rows still to do",
            self.device,
            len(rows),
            longest,
            padded,
            self.max_tokens,
        )
