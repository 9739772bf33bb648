"""Merge of >= 1.5 GB of shards: embedfleet's streaming merge vs `cat` vs load-all-then-save.

Builds a run dir with real embed shards (safetensors + parquet + markers, random unit
vectors), then runs, each in a fresh process so peak RSS is its own:
  1. `python -m jobs.merge` (validation, sha256 of every shard, NaN/Inf scan, streaming
     write, metadata, quality report; by_source off: it is a separate pass);
  2. `cat shard_*.safetensors > out` (the same bytes, no checks), and `cat` + `sync`;
  3. load every shard with safetensors.numpy.load_file, np.concatenate, save_file.

    .venv/bin/python bench/bench_merge.py [--gb 1.6] [--shards 16] [--dim 384] [--dir /tmp/efbench]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import OmegaConf
from safetensors.numpy import save_file

from bench._util import REPO, child_peak_rss, machine, save
from cli.run import save_run_config
from lib.config.compose import register_resolvers
from lib.config.schema import EmbedfleetConfig
from lib.core.hashing import sha256_file
from lib.core.markers import CompletionMarker, write_marker
from lib.core.paths import RUN_CONFIG, RunPaths
from lib.core.sharding import contiguous_range
from lib.core.storage import OutputFile
from lib.formats.parquet import DROPPED_SCHEMA
from lib.plan.registry import build_plan

LOAD_ALL = """
import sys, glob, numpy as np
from safetensors.numpy import load_file, save_file
files = sorted(glob.glob(sys.argv[1] + "/shard_*.safetensors"))
arrays = [load_file(f)["embeddings"] for f in files]
save_file({"embeddings": np.concatenate(arrays)}, sys.argv[2])
"""


def build_run(run_dir: Path, rows: int, dim: int, shards: int) -> int:
    register_resolvers()
    cfg = OmegaConf.structured(EmbedfleetConfig)
    cfg.run.dir = str(run_dir)
    cfg.run.root = str(run_dir.parent)
    cfg.dataset.path = "/bench/synthetic.parquet"
    cfg.dataset.name = "synthetic"
    cfg.embed.num_shards = shards
    cfg.merge.by_source = False
    plan = build_plan(cfg, rows)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(run_dir, cfg)
    plan.save(run_dir)
    storage = RunPaths(run_dir).storage
    embed = plan.stage("embed")
    rng = np.random.default_rng(0)
    total_bytes = 0
    for t in range(shards):
        a, b = contiguous_range(rows, t, shards)
        emb = rng.standard_normal((b - a, dim), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        files = RunPaths.embed_shard(t)
        paths = {k: run_dir / getattr(files, k) for k in ("embeddings", "metadata", "dropped")}
        paths["embeddings"].parent.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": emb}, str(paths["embeddings"]))
        idx = np.arange(a, b, dtype=np.int64)
        pq.write_table(
            pa.table({"row_index": idx, "id": idx.astype(str), "source": ["s"] * len(idx)}),
            paths["metadata"],
        )
        pq.write_table(DROPPED_SCHEMA.empty_table(), paths["dropped"])
        outputs = [
            OutputFile(str(p.relative_to(run_dir)), p.stat().st_size, sha256_file(p))
            for p in paths.values()
        ]
        write_marker(
            storage,
            RunPaths.marker("embed", t),
            CompletionMarker(
                "embed",
                t,
                shards,
                embed.config_hash,
                row_range=[a, b],
                counts={"embedded": b - a, "dim": dim},
                outputs=outputs,
            ),
        )
        total_bytes += paths["embeddings"].stat().st_size
        del emb
    return total_bytes


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gb", type=float, default=1.6)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--dir", default="/tmp/efbench-merge")
    ap.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    run_dir = root / "run"
    rows = int(args.gb * 1e9 / (args.dim * 4))
    size = build_run(run_dir, rows, args.dim, args.shards)
    shards = sorted((run_dir / "embed" / "shards").glob("shard_*.safetensors"))
    py = sys.executable
    results = {}
    try:
        # Warm the page cache once so every contender reads from memory alike.
        child_peak_rss(["sh", "-c", 'cat "$@" > /dev/null', "sh", *map(str, shards)], cwd=root)
        order = ["merge", "cat", "cat+sync", "load-all", "merge (no sha256)"]
        for name in order:
            out = root / "out.bin"
            out.unlink(missing_ok=True)
            shutil.rmtree(run_dir / "merge", ignore_errors=True)
            if name.startswith("merge"):
                env = {"EMBEDFLEET_LOG_LEVEL": "WARNING"}
                cmd = [py, "-m", "jobs.merge", "--run-dir", str(run_dir)]
                if "no sha" in name:
                    cfg_path = run_dir / RUN_CONFIG
                    cfg_path.write_text(
                        cfg_path.read_text().replace("verify_sha256: true", "verify_sha256: false")
                    )
                wall, rss, _ = child_peak_rss(cmd, env=env, cwd=REPO)
            elif name == "cat":
                wall, rss, _ = child_peak_rss(
                    ["sh", "-c", 'cat "$@" > out.bin', "sh", *map(str, shards)], cwd=root
                )
            elif name == "cat+sync":
                wall, rss, _ = child_peak_rss(
                    ["sh", "-c", 'cat "$@" > out.bin && sync out.bin', "sh", *map(str, shards)],
                    cwd=root,
                )
            else:
                wall, rss, _ = child_peak_rss(
                    [py, "-c", LOAD_ALL, str(shards[0].parent), str(out)], cwd=root
                )
            results[name] = {"seconds": wall, "peak_rss_mib": rss}
            print(f"{name}: {wall:.2f}s, peak RSS {rss:.0f} MiB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    cat = results["cat"]["seconds"]
    payload = {
        "bytes": size,
        "rows": rows,
        "dim": args.dim,
        "shards": args.shards,
        "results": results,
        "merge_vs_cat": results["merge"]["seconds"] / cat,
        "merge_vs_cat_sync": results["merge"]["seconds"] / results["cat+sync"]["seconds"],
    }
    save("merge", payload)
    print(f"\nmachine: {machine()}")
    print(f"{size / 1e9:.2f} GB in {args.shards} shards ({rows} x {args.dim} float32)\n")
    print("| method | wall s | vs cat | peak RSS MiB |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['seconds']:.2f} | {r['seconds'] / cat:.2f}x | {r['peak_rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
