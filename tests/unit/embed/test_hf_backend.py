"""The hf backend with the real model: batching, pooling, and the OOM retry path."""

import logging

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lib.config.schema import EmbedfleetConfig
from lib.embed.backends.hf import HFEmbedder, length_sorted_batches, pool
from lib.embed.params import Pooling

TEXTS = [
    "Return the number of items in a container.",
    "Parse an email message from a string and return a Message object with headers.",
    "x",
    "Create a new event loop; " * 12,
]


@pytest.fixture(scope="module")
def embedder():
    cfg = OmegaConf.structured(EmbedfleetConfig)
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


def test_matryoshka_dimensions_are_renormalised():
    cfg = OmegaConf.structured(EmbedfleetConfig)
    cfg.model.dimensions = 64
    emb = HFEmbedder.from_config(cfg.model, cfg.embed)
    out = emb.embed(_ids(emb, TEXTS))
    assert out.shape == (4, 64)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_cuda_oom_halves_the_batch_and_says_so(embedder, caplog):
    # CUDA out-of-memory cannot happen on this CPU-only machine, so it is injected here:
    # any forward pass of more than one row raises torch.OutOfMemoryError once.
    real_forward = embedder._forward
    seen = []

    def forward(ids):
        seen.append(len(ids))
        if len(ids) > 1 and len(seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(ids)

    embedder._forward = forward
    try:
        with caplog.at_level(logging.WARNING):
            out = embedder.embed(_ids(embedder, TEXTS[:2]))
    finally:
        embedder._forward = real_forward
    assert seen == [2, 1, 1]
    assert "halving the batch" in caplog.text
    assert np.allclose(out, embedder.embed(_ids(embedder, TEXTS[:2])), atol=1e-6)
