"""Activation extraction on a GPU: the extract stage's torch backend (``TorchForward``:
forward hooks, the decoder run only up to the last requested layer, bf16 copies into
pinned host buffers with ``non_blocking=True``) vs the seed's way (the whole model with
``output_hidden_states=True``, each layer's rows ``.to(bf16).cpu()``), on a
Qwen2.5-7B-shaped model with random weights built on the GPU (nothing downloaded),
hidden states 15-18, batches of 16 x 512 random token ids, rounds interleaved (ours, seed,
ours, seed, ...) after one warm-up pass each. Reports tokens/s of each, the ratio, and
the TFLOP/s each reaches (2 x the parameters it runs per token, attention excluded) as a
percentage of the GPU's measured bf16 matmul rate. Under 5 minutes on one H100/H200.

    python -m bench.gpu.extract --out results/extract.json [--batches 6] [--rounds 3] [--smoke]
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf

from bench.gpu.common import device, gpu_name, matmul_peak, parser, row, sync, timed, write
from lib.extract.model import HiddenStates, TorchForward
from lib.extract.params import ExtractParams
from lib.extract.samples import Sample

LAYERS = [15, 16, 17, 18]
QWEN25_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TINY = dict(
    QWEN25_7B,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    num_hidden_layers=20,
)


def build(dev: torch.device, smoke: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dtype = torch.float32 if smoke else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with dev:  # random weights created on the device, in bf16: no 30 GB fp32 copy
            model = Qwen2ForCausalLM(Qwen2Config(**(TINY if smoke else QWEN25_7B)))
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), ("fp32" if smoke else "bf16")


def params_up_to(model, last: int) -> tuple[int, int]:
    """(parameters of decoder layers 1..last, parameters run by the whole model per token
    but the embedding lookup: every layer, the final norm and the LM head)."""
    layers = model.model.layers
    run = sum(p.numel() for blk in layers[:last] for p in blk.parameters())
    whole = sum(p.numel() for blk in layers for p in blk.parameters())
    whole += sum(p.numel() for p in model.lm_head.parameters())
    return run, whole


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    if args.smoke:
        args.batches, args.rounds, args.batch, args.seq = 2, 2, 2, 32
    dev = device(args.smoke)
    model, compute = build(dev, args.smoke)
    p = OmegaConf.structured(ExtractParams)
    p.layers, p.device, p.compute_dtype, p.dtype = LAYERS, dev.type, compute, "bf16"
    p.batch_size, p.max_seq_length = args.batch, args.seq
    ours = TorchForward(None, p, pad_id=0, model=model)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    vocab = int(model.config.vocab_size)
    batches = []
    for b in range(args.batches):
        ids = rng.integers(10, vocab, (args.batch, args.seq)).astype(np.int32)
        batches.append(
            [
                Sample(
                    b * args.batch + i,
                    r,
                    np.zeros(args.seq, np.int64),
                    np.arange(args.seq, dtype=np.int32),
                )
                for i, r in enumerate(ids)
            ]
        )
    tensors = [
        torch.from_numpy(np.stack([s.token_ids for s in b]).astype(np.int64)) for b in batches
    ]

    def run_ours():
        for b in batches:
            ours(b)

    def run_seed():
        # ours' hooks stop the forward after layer 18: off for the whole model, then back
        ours.capture.close()
        try:
            seed_pass()
        finally:
            ours.capture = HiddenStates(model, ours.layers)

    def seed_pass():
        for t in tensors:
            with torch.inference_mode():
                out = model(t.to(dev), output_hidden_states=True)
                [
                    out.hidden_states[k]
                    .reshape(-1, out.hidden_states[k].shape[-1])
                    .to(torch.bfloat16)
                    .cpu()
                    for k in LAYERS
                ]

    ours(batches[0])
    run_seed()  # warm-ups: one pass each
    sync(dev)
    tokens = args.batches * args.batch * args.seq
    rates: dict[str, list[float]] = {"ours": [], "seed": []}
    for _ in range(args.rounds):
        rates["ours"].append(tokens / timed(run_ours, dev)[0])
        rates["seed"].append(tokens / timed(run_seed, dev)[0])
    best = {k: max(v) for k, v in rates.items()}
    run_p, whole_p = params_up_to(model, max(LAYERS))
    peak = matmul_peak(dev, torch.bfloat16, tf32=False, n=256 if args.smoke else 8192)
    tflops = {"ours": best["ours"] * 2 * run_p / 1e12, "seed": best["seed"] * 2 * whole_p / 1e12}
    shape = f"{args.batch} x {args.seq}, layers 15-18, {compute}"
    rows = [
        row(
            "extract",
            "ours: hooks, up to layer 18, pinned copies",
            best["ours"],
            "tokens/s",
            f"{shape}; rounds {[round(r) for r in rates['ours']]}",
        ),
        row(
            "extract",
            "seed: whole model, output_hidden_states, .cpu()",
            best["seed"],
            "tokens/s",
            f"rounds {[round(r) for r in rates['seed']]}",
        ),
        row("extract", "ours / seed", best["ours"] / best["seed"], "x", "best round of each"),
        row(
            "extract",
            "ours: % of bf16 matmul peak",
            100 * tflops["ours"] / peak,
            "%",
            f"{tflops['ours']:.0f} of {peak:.0f} TFLOP/s (2 x {run_p / 1e9:.2f} B params/token)",
        ),
        row(
            "extract",
            "seed: % of bf16 matmul peak",
            100 * tflops["seed"] / peak,
            "%",
            f"{tflops['seed']:.0f} TFLOP/s (2 x {whole_p / 1e9:.2f} B params/token)",
        ),
    ]
    write(args.out, rows, gpu=gpu_name(dev), smoke=args.smoke, oom_halvings=ours.oom_halvings)


if __name__ == "__main__":
    main()
