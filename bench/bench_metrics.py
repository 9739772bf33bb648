"""Benchmark cluster metrics: ours (lib.metrics, world size 1 and 2) vs scikit-learn.

    python bench/bench_metrics.py                        # both benchmarks, 1 round
    python bench/bench_metrics.py --only silhouette --rounds 2
    python bench/bench_metrics.py --sil-n 20000 --db-n 200000   # smaller, quicker

Two problems, each on one fixed data set and labelling (seeded Gaussian blobs, unit
norm like sentence embeddings, float32, labels = generating blob, written once as .npy):

- silhouette, exact: N=50,000, D=384, k=50: ours (``lib.metrics.silhouette``, float32
  pairwise products, symmetric blocks) vs ``sklearn.metrics.silhouette_score``;
- Davies-Bouldin: N=1,000,000, D=384, k=1,000: ours (``compute_metrics`` with only the
  centroid passes: inertia, Davies-Bouldin, Calinski-Harabasz) vs
  ``sklearn.metrics.davies_bouldin_score``.

Every method runs in its own fresh subprocess and reports its compute time (loading is
not timed: scikit-learn gets the array in memory, ours reads the memmap, warm in the page
cache) and its peak RSS (``ru_maxrss``; for ours this includes the memmap's file pages it
touched). World size 2 is two such processes (gloo), reporting the slower rank's time and
the larger RSS. All processes run with one thread (OMP_NUM_THREADS=1,
torch.set_num_threads(1)) so that the world-size comparison means something on a small
machine. With ``--rounds R`` the methods are interleaved (A B C A B C ...) and the
median is reported, since other work on the machine changes speed over time.

Prints a markdown table; writes JSON to bench/results/metrics.json (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._util import machine, save  # noqa: E402

DATA = ROOT / "bench" / "results" / "metrics_data"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# -- data -----------------------------------------------------------------------------------
def make_data(name: str, n: int, dim: int, k: int, seed: int, chunk: int = 100_000):
    """Blobs + noise, unit norm, float32, labels = blob; written once (cached by name)."""
    from lib.formats.arrays import ArraySpec, save_npy, write_sidecar

    x_path, y_path = DATA / f"{name}_X.npy", DATA / f"{name}_y.npy"
    if x_path.exists() and y_path.exists():
        return x_path, y_path
    DATA.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim), dtype=np.float32)
    labels = rng.integers(0, k, n)
    out = np.lib.format.open_memmap(x_path.with_suffix(".tmp"), "w+", np.float32, (n, dim))
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        x = centres[labels[a:b]] + 1.2 * rng.standard_normal((b - a, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[a:b] = x
    out.flush()
    del out
    x_path.with_suffix(".tmp").rename(x_path)
    write_sidecar(x_path, ArraySpec((n, dim), "float32"))
    save_npy(y_path, labels.astype(np.int64))
    return x_path, y_path


# -- workers (one per subprocess) -------------------------------------------------------------
def worker(method: str, x_path: str, y_path: str, k: int, block_rows: int) -> dict:
    import torch

    torch.set_num_threads(1)
    labels = np.load(y_path)
    if method.startswith("sklearn"):
        from sklearn import metrics as skm

        X = np.load(x_path)  # in memory, as scikit-learn expects
        t = time.perf_counter()
        if method == "sklearn_silhouette":
            value = float(skm.silhouette_score(X, labels))
        else:
            value = float(skm.davies_bouldin_score(X, labels))
        seconds = time.perf_counter() - t
    else:
        from lib.compute.comm import Comm
        from lib.compute.distributed import process_group
        from lib.metrics.compute import compute_metrics
        from lib.metrics.params import MetricsParams
        from lib.metrics.silhouette import silhouette

        X = np.load(x_path, mmap_mode="r")
        with process_group():
            comm = Comm.current()
            t = time.perf_counter()
            if method == "ours_silhouette":
                params = MetricsParams(block_rows=block_rows, compute_dtype="float32")
                value, _, _ = silhouette(X, labels, k, params, comm=comm)
            else:
                params = MetricsParams(
                    block_rows=block_rows * 4,
                    compute_dtype="float64",
                    silhouette_exact_max=0,
                    simplified_silhouette=False,
                )
                res = compute_metrics(X, labels, k, params, comm=comm, progress=lambda _: None)
                value = float(res.scalars["davies_bouldin"])
            seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"value": value, "seconds": seconds, "peak_rss_mib": rss}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_method(method: str, x: Path, y: Path, k: int, world: int, block_rows: int) -> dict:
    """Run ``method`` in ``world`` fresh processes; the slowest rank's time, largest RSS."""
    port = _free_port()
    cmd = [sys.executable, __file__, "--worker", method, str(x), str(y), str(k), str(block_rows)]
    procs = []
    for r in range(world):
        env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)}
        if world > 1:
            env.update(RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
            env["MASTER_PORT"] = str(port)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"{method} (world {world}) failed with code {p.returncode}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "value": outs[0]["value"],
        "seconds": max(o["seconds"] for o in outs),
        "peak_rss_mib": max(o["peak_rss_mib"] for o in outs),
    }


def bench(name: str, x: Path, y: Path, k: int, rounds: int, block_rows: int) -> list[dict]:
    methods = [(f"sklearn_{name}", 1), (f"ours_{name}", 1), (f"ours_{name}", 2)]
    runs: dict[tuple[str, int], list[dict]] = {m: [] for m in methods}
    for r in range(rounds):
        for method, world in methods:  # interleaved
            res = run_method(method, x, y, k, world, block_rows)
            print(
                f"  round {r + 1}: {method} ws{world}: {res['seconds']:.1f}s "
                f"{res['peak_rss_mib']:.0f} MiB value={res['value']:.9f}",
                flush=True,
            )
            runs[(method, world)].append(res)
    rows = []
    for (method, world), rs in runs.items():
        rows.append(
            {
                "metric": name,
                "method": method.split("_")[0],
                "world_size": world,
                "seconds": statistics.median(r["seconds"] for r in rs),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                "value": rs[0]["value"],
                "all_seconds": [r["seconds"] for r in rs],
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", nargs=5, metavar=("METHOD", "X", "Y", "K", "BLOCK"))
    ap.add_argument("--only", choices=["silhouette", "davies_bouldin"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--sil-n", type=int, default=50_000)
    ap.add_argument("--sil-k", type=int, default=50)
    ap.add_argument("--db-n", type=int, default=1_000_000)
    ap.add_argument("--db-k", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--block-rows", type=int, default=2048)
    args = ap.parse_args()
    if args.worker:
        method, x, y, k, block = args.worker
        print(json.dumps(worker(method, x, y, int(k), int(block))))
        return 0
    print(f"machine: {machine()}")
    rows = []
    if args.only in (None, "silhouette"):
        x, y = make_data(
            f"sil_{args.sil_n}_{args.dim}_{args.sil_k}", args.sil_n, args.dim, args.sil_k, 0
        )
        print(f"silhouette, exact: N={args.sil_n} D={args.dim} k={args.sil_k}")
        rows += bench("silhouette", x, y, args.sil_k, args.rounds, args.block_rows)
    if args.only in (None, "davies_bouldin"):
        x, y = make_data(
            f"db_{args.db_n}_{args.dim}_{args.db_k}", args.db_n, args.dim, args.db_k, 1
        )
        print(f"Davies-Bouldin: N={args.db_n} D={args.dim} k={args.db_k}")
        rows += bench("davies_bouldin", x, y, args.db_k, args.rounds, args.block_rows)
    print()
    print(
        "| metric | method | world size | time (s) | vs scikit-learn | vs ours ws1 | peak RSS (MiB) | value |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        sk = next(o for o in rows if o["metric"] == r["metric"] and o["method"] == "sklearn")
        w1 = next(
            o for o in rows
            if o["metric"] == r["metric"] and o["method"] == "ours" and o["world_size"] == 1
        )  # fmt: skip
        speed = sk["seconds"] / r["seconds"]
        scale = f"{w1['seconds'] / r['seconds']:.2f}x" if r["method"] == "ours" else "–"
        print(
            f"| {r['metric']} | {r['method']} | {r['world_size']} | {r['seconds']:.1f} | "
            f"{speed:.2f}x | {scale} | {r['peak_rss_mib']:.0f} | {r['value']:.9f} |"
        )
    path = save("metrics", {"args": vars(args), "rows": rows})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
