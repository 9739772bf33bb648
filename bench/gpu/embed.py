"""Embedding throughput of the ``hf`` backend in bf16 on a Qwen3-Embedding-0.6B-shaped
random-weight model: length-sorted token-budgeted batches (ours) vs the same budget in
input order (unsorted) vs a plain transformers loop (fixed 32-row batches, input order,
padded to the batch's longest row), in real (unpadded) tokens per second, and against the
roofline of the GPU's measured bf16 matmul rate (2 x parameters FLOP per token).

    python -m bench.gpu.embed --out results/embed.json [--rows 4096] [--smoke]
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf

from bench.gpu.common import device, gpu_name, matmul_peak, parser, row, timed, write
from bench.gpu.models import parameters, qwen3_embedding_shaped
from lib.config.schema import EmbedfleetConfig
from lib.embed.backends.hf import HFEmbedder, pool
from lib.embed.params import Pooling

MAX_LENGTH = 512


def token_ids(rows: int, seed: int = 0) -> list[list[int]]:
    """Rows of a log-normal length mix (median ~120 tokens, 16..512), random ids."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(120), 0.8, rows).astype(int), 16, MAX_LENGTH)
    return [[101, *rng.integers(1000, 30000, n - 2).tolist(), 102] for n in lengths]


def input_order_batches(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """The same row and padded-token budget as ours, but in input order (no sorting)."""
    batches, batch, width = [], [], 0
    for i, n in enumerate(lengths):
        w = max(width, n)
        if batch and (len(batch) + 1 > max_rows or (len(batch) + 1) * w > max_tokens):
            batches.append(batch)
            batch, w = [], n
        batch.append(i)
        width = w
    return [*batches, batch] if batch else batches


def ours(path, dev: torch.device) -> HFEmbedder:
    cfg = OmegaConf.structured(EmbedfleetConfig)
    cfg.model.path = str(path)
    cfg.model.name = path.name
    cfg.model.pooling = "last"
    cfg.model.normalize = True
    cfg.model.max_length = MAX_LENGTH
    cfg.embed.device = dev.type
    cfg.embed.batch_size = 256
    cfg.embed.max_tokens_per_batch = 32768
    return HFEmbedder.from_config(cfg.model, cfg.embed)


def unsorted(emb: HFEmbedder, ids: list[list[int]]) -> np.ndarray:
    out = np.empty((len(ids), emb.dim), np.float32)
    with torch.inference_mode():
        for b in input_order_batches([len(x) for x in ids], emb.batch_size, emb.max_tokens):
            out[b] = emb._forward([ids[i] for i in b]).cpu().numpy()
    return out


def plain_hf(path, dev: torch.device, ids: list[list[int]], rows: int = 32) -> np.ndarray:
    """What a user would write with transformers alone."""
    from transformers import AutoModel, AutoTokenizer

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = AutoModel.from_pretrained(str(path), dtype=dtype).to(dev).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    out = np.empty((len(ids), model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for s in range(0, len(ids), rows):
            batch = tok.pad({"input_ids": ids[s : s + rows]}, padding=True, return_tensors="pt")
            batch = {k: v.to(dev) for k, v in batch.items()}
            hidden = model(**batch).last_hidden_state
            emb = torch.nn.functional.normalize(pool(hidden, batch["attention_mask"], Pooling.last))
            out[s : s + rows] = emb.cpu().numpy()
    del model
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cache", default="bench/gpu/.models")
    args = ap.parse_args()
    dev = device(args.smoke)
    from pathlib import Path

    path = qwen3_embedding_shaped(Path(args.cache), smoke=args.smoke)
    ids = token_ids(48 if args.smoke else args.rows)
    tokens = sum(len(x) for x in ids)
    emb = ours(path, dev)
    emb.embed(ids[:64])  # warm-up: kernels, allocator
    t_sorted, a = timed(lambda: emb.embed(ids), dev)
    t_unsorted, b = timed(lambda: unsorted(emb, ids), dev)
    t_plain, c = timed(lambda: plain_hf(path, dev, ids), dev)
    dt = str(emb.dtype).removeprefix("torch.")
    agree = float(min(np.sum(a * c, 1).min(), np.sum(a * b, 1).min()))
    rows = [
        row("embed", f"hf {dt}, length-sorted (ours)", tokens / t_sorted, "tokens/s"),
        row("embed", f"hf {dt}, same budget, input order", tokens / t_unsorted, "tokens/s"),
        row("embed", "plain transformers, 32-row batches", tokens / t_plain, "tokens/s",
            "includes model load"),
        row("embed", "sorted / unsorted", t_unsorted / t_sorted, "x"),
        row("embed", "sorted / plain transformers", t_plain / t_sorted, "x"),
        row("embed", "min cosine ours vs the others", agree, "", "same model: ~1"),
    ]  # fmt: skip
    if dev.type == "cuda":
        peak = matmul_peak(dev, torch.bfloat16, tf32=False)
        roof = peak * 1e12 / (2 * parameters(path))
        rows += [
            row("embed", "bf16 matmul peak (measured)", peak, "TFLOP/s"),
            row("embed", "roofline 2*params FLOP/token", roof, "tokens/s"),
            row("embed", "ours / roofline", tokens / t_sorted / roof, "", "attention not counted"),
        ]
    write(args.out, rows, gpu=gpu_name(dev), n_rows=len(ids), tokens=tokens, model=str(path))


if __name__ == "__main__":
    main()
