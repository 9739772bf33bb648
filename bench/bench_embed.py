"""Embedding throughput: the `hf` backend vs SentenceTransformer.encode (defaults).

Same texts (stdlib docstrings of <= 256 tokens), same model, same machine, one process.
Rounds alternate ours / ST so that background load hits both alike; medians are reported.
Ours includes tokenization (the length filter) since ST.encode tokenizes too.

    .venv/bin/python bench/bench_embed.py [--texts 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow.parquet as pq
import torch
from omegaconf import OmegaConf

from bench._util import machine, save
from lib.config.schema import EmbedfleetConfig
from lib.data.corpus import builtin_corpus_path
from lib.embed.backends.hf import HFEmbedder
from lib.embed.token_filter import filter_by_length


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", default="outputs/.cache")
    args = ap.parse_args()

    corpus = pq.read_table(builtin_corpus_path("stdlib_docstrings", Path(args.cache)))
    cfg = OmegaConf.structured(EmbedfleetConfig)
    emb = HFEmbedder.from_config(cfg.model, cfg.embed)
    st = emb.model  # the same SentenceTransformer object: same weights, same threads
    all_texts = corpus.column("text").to_pylist()
    keep = filter_by_length(emb.tokenizer, all_texts, int(cfg.model.max_length)).kept
    texts = [all_texts[i] for i in keep[: args.texts]]
    n_tokens = sum(len(t) for t in filter_by_length(emb.tokenizer, texts, 256).token_ids)

    def ours() -> np.ndarray:
        f = filter_by_length(emb.tokenizer, texts, int(cfg.model.max_length))
        return emb.embed(f.token_ids)

    def reference() -> np.ndarray:
        return st.encode(texts)

    ours(), reference()  # warm-up (allocator, kernels)
    t_ours, t_ref = [], []
    for _ in range(args.rounds):
        for fn, sink in ((ours, t_ours), (reference, t_ref)):
            t0 = time.perf_counter()
            out = fn()
            sink.append(time.perf_counter() - t0)
    a, b = ours(), reference()
    cos = float((a * b).sum(1).min())
    med_o, med_r = statistics.median(t_ours), statistics.median(t_ref)
    result = {
        "texts": len(texts),
        "tokens": n_tokens,
        "threads": torch.get_num_threads(),
        "ours_texts_per_s": len(texts) / med_o,
        "st_encode_texts_per_s": len(texts) / med_r,
        "ours_tokens_per_s": n_tokens / med_o,
        "speedup": med_r / med_o,
        "min_cosine": cos,
        "rounds_ours_s": t_ours,
        "rounds_st_s": t_ref,
        "settings": {
            "batch_size": cfg.embed.batch_size,
            "max_tokens_per_batch": cfg.embed.max_tokens_per_batch,
        },
    }
    save("embed", result)
    print(f"machine: {machine()}")
    print("| backend | texts/s | tokens/s |")
    print("|---|---|---|")
    print(
        f"| embedfleet hf (filter + token-budget batches) | {result['ours_texts_per_s']:.1f} | {result['ours_tokens_per_s']:.0f} |"
    )
    print(
        f"| SentenceTransformer.encode (defaults) | {result['st_encode_texts_per_s']:.1f} | {n_tokens / med_r:.0f} |"
    )
    print(
        f"speedup {result['speedup']:.2f}x (goal >= 1.5x); min cosine {cos:.6f}; {len(texts)} texts, {n_tokens} tokens, median of {args.rounds} rounds"
    )
    del out


if __name__ == "__main__":
    main()
