"""The hf backend with the real model: batching, pooling, and the OOM retry path.

Pinned to the CPU (``embed.device=cpu``): the references are fp32 CPU results, which a
GPU's bf16 would not match at these tolerances (the GPU comparison is in tests/gpu/).
"""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lib.config.schema import EmbedfleetConfig
from lib.core.errors import ModelError
from lib.embed.backends.hf import HFEmbedder, is_out_of_memory, length_sorted_batches, pool
from lib.embed.params import Pooling

TEXTS = [
    "Return the number of items in a container.",
    "Parse an email message from a string and return a Message object with headers.",
    "x",
    "Create a new event loop; " * 12,
]


def _cpu_config():
    cfg = OmegaConf.structured(EmbedfleetConfig)
    cfg.embed.device = "cpu"
    return cfg


@pytest.fixture(scope="module")
def embedder():
    cfg = _cpu_config()
    cfg.embed.batch_size = 2
    return HFEmbedder.from_config(cfg.model, cfg.embed)


def _ids(emb, texts):
    return emb.tokenizer(texts, add_special_tokens=True)["input_ids"]


def test_matches_sentence_transformers_in_input_order(embedder, st_model):
    ours = embedder.embed(_ids(embedder, TEXTS))
    ref = st_model.encode(TEXTS)
    assert ours.shape == (4, 384) and ours.dtype == np.float32
    assert np.allclose(ours, ref, atol=1e-5)


def test_batches_respect_row_and_token_budgets():
    lengths = [5, 50, 7, 49, 3, 48]
    batches = list(length_sorted_batches(lengths, max_rows=3, max_tokens=100))
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 100
    assert batches[0][0] == 1  # longest first


def test_pooling_modes():
    h = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # right- and left-padded rows
    assert torch.equal(pool(h, mask, Pooling.cls), h[:, 0])
    assert torch.equal(pool(h, mask, Pooling.last), torch.stack([h[0, 1], h[1, 2]]))
    assert torch.allclose(
        pool(h, mask, Pooling.mean), torch.stack([h[0, :2].mean(0), h[1, 1:].mean(0)])
    )


def test_mean_pooling_is_float32_whatever_the_model_dtype():
    torch.manual_seed(0)
    h = torch.randn(2, 300, 8).to(torch.bfloat16)
    mask = torch.ones(2, 300, dtype=torch.int64)
    pooled = pool(h, mask, Pooling.mean)
    assert pooled.dtype == torch.float32
    assert torch.allclose(pooled, h.float().mean(1), atol=1e-6)


def test_weights_load_in_the_compute_dtype_and_pool_in_float32():
    cfg = _cpu_config()
    cfg.model.dtype = "bfloat16"
    emb = HFEmbedder.from_config(cfg.model, cfg.embed)
    assert {p.dtype for p in emb.model.parameters()} == {torch.bfloat16}
    ids = _ids(emb, TEXTS)
    batch = emb.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = emb._st_forward(dict(batch))
        assert out["token_embeddings"].dtype == torch.float32  # cast before Pooling
        assert out["sentence_embedding"].dtype == torch.float32
    fp32 = HFEmbedder.from_config(_cpu_config().model, _cpu_config().embed)
    a, b = emb.embed(ids), fp32.embed(ids)
    # bf16 weights: cosine to the fp32 result above 0.99 (bf16 has 8 mantissa bits).
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def test_matryoshka_dimensions_are_renormalised():
    cfg = _cpu_config()
    cfg.model.dimensions = 64
    emb = HFEmbedder.from_config(cfg.model, cfg.embed)
    out = emb.embed(_ids(emb, TEXTS))
    assert out.shape == (4, 64)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def _oom_above(embedder, threshold: int, calls: list[int], error=torch.cuda.OutOfMemoryError):
    """A forward pass that runs out of memory above ``threshold`` padded tokens, as a GPU
    with room for that many would (CUDA cannot run out of memory on this CPU machine)."""
    real_forward = embedder._forward

    def forward(ids):
        padded = len(ids) * max(len(x) for x in ids)
        calls.append(padded)
        if padded > threshold:
            raise error(f"CUDA out of memory (injected: {padded} padded tokens)")
        return real_forward(ids)

    return forward


def _same_length_rows(n: int, length: int) -> list[list[int]]:
    return [[101] + [2023 + i % 50] * (length - 2) + [102] for i in range(n)]


def test_cuda_oom_halves_the_budget_once_per_oom_and_keeps_it(embedder, caplog):
    # 32 rows of 8 tokens, budget 256 padded tokens, room for 32: the budget halves
    # 256 -> 128 -> 64 -> 32 (three OOMs), then 8 batches of 4 rows; the next part runs
    # its 8 batches at once. Halving each sub-batch's budget again (the old bug) ends at a
    # budget of 2 and one-row batches in the next part.
    ids = _same_length_rows(32, 8)
    emb = dataclasses.replace(embedder, batch_size=64, max_tokens=256)
    expected = emb.embed(ids)
    calls: list[int] = []
    emb._forward = _oom_above(emb, 32, calls)
    with caplog.at_level(logging.WARNING, logger="lib.embed.backends.hf"):
        out = emb.embed(ids)
    assert calls == [256, 128, 64] + [32] * 8
    assert emb.max_tokens == 32
    warnings = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 3 and "token budget is now 32" in warnings[-1]
    assert np.allclose(out, expected, atol=1e-6)
    calls.clear()
    emb.embed(ids)  # the next part
    assert calls == [32] * 8


def test_cublas_allocation_failure_is_an_oom_and_other_errors_are_not(embedder):
    ids = _same_length_rows(4, 8)
    emb = dataclasses.replace(embedder, batch_size=8, max_tokens=1024)
    calls: list[int] = []
    emb._forward = _oom_above(emb, 16, calls, RuntimeError)  # "... out of memory ..."
    emb.embed(ids)
    assert calls == [32, 16, 16] and emb.max_tokens == 16
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    emb._forward = lambda ids: (_ for _ in ()).throw(RuntimeError("shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes"):
        emb.embed(ids)


def test_a_single_row_that_does_not_fit_is_a_clear_error(embedder):
    emb = dataclasses.replace(embedder, batch_size=8, max_tokens=1024)
    emb._forward = _oom_above(emb, 10, [])
    with pytest.raises(ModelError, match="single row of 16 tokens: lower model.max_length"):
        emb.embed(_same_length_rows(2, 16))
