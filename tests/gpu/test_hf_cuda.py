"""The hf backend on CUDA: bf16 against the fp32 CPU result, and a real out-of-memory.

Tolerances: bf16 weights and activations (8-bit mantissa) with fp32 pooling give a cosine
>= 0.995 to the fp32 CPU embedding of every row (mean 0.999 or better) on all-MiniLM-L6-v2.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lib.config.schema import EmbedfleetConfig
from lib.embed.backends.hf import HFEmbedder

pytestmark = pytest.mark.gpu

TEXTS = [
    "Return the number of items in a container.",
    "Parse an email message from a string and return a Message object with headers.",
    "x",
    "Create a new event loop; " * 12,
] * 8


def _embedder(device: str, dtype: str = "auto", **embed) -> HFEmbedder:
    cfg = OmegaConf.structured(EmbedfleetConfig)
    cfg.embed.device = device
    cfg.model.dtype = dtype
    for k, v in embed.items():
        cfg.embed[k] = v
    return HFEmbedder.from_config(cfg.model, cfg.embed)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_bf16_on_cuda_is_close_to_fp32_on_cpu():
    gpu = _embedder("cuda")
    assert gpu.dtype == torch.bfloat16 and gpu.device.type == "cuda"
    assert {p.dtype for p in gpu.model.parameters()} == {torch.bfloat16}
    cpu = _embedder("cpu")
    ids = gpu.tokenizer(TEXTS)["input_ids"]
    cos = _cosines(gpu.embed(ids), cpu.embed(ids))
    assert cos.min() >= 0.995 and cos.mean() >= 0.999, cos


def test_a_real_cuda_oom_lowers_the_budget_and_the_output_is_unchanged(caplog):
    emb = _embedder("cuda", batch_size=512, max_tokens_per_batch=1 << 20)
    ids = [[101] + [2023] * 254 + [102]] * 512  # 512 rows x 256 tokens in one batch
    reference = _embedder("cuda", batch_size=8).embed(ids[:8])
    # Room for the weights and a few rows only: the 131,072-token batch cannot fit.
    torch.cuda.set_per_process_memory_fraction(
        (torch.cuda.memory_allocated() + (256 << 20))
        / torch.cuda.get_device_properties(0).total_memory
    )
    try:
        with caplog.at_level(logging.WARNING, logger="lib.embed.backends.hf"):
            out = emb.embed(ids)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    halvings = [r for r in caplog.records if "token budget is now" in r.getMessage()]
    assert halvings and emb.max_tokens < 512 * 256
    assert len(halvings) <= 12  # once per OOM, from the failed batch's size
    assert _cosines(out[:8], reference).min() >= 0.999
