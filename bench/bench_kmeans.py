"""Benchmark level-1 k-means: ours vs faiss.Kmeans vs scikit-learn KMeans, same data.

    python bench/bench_kmeans.py                  # 200,000 x 384 float32, k=1000, 20 iterations
    python bench/bench_kmeans.py --ranks 2        # ours as 2 gloo ranks (threads split)
    python bench/bench_kmeans.py --device cuda    # GPU throughput: 1M x 768, k=10,000 (ours)
    python bench/bench_kmeans.py --device cpu --throughput --n 20000 --dim 64 --k 100
                                                  # the throughput mode's code path on CPU

Comparison mode: the data (a seeded mixture of 2,000 Gaussian blobs with heavy noise,
L2-normalised like sentence embeddings, so Lloyd does not converge within 20
iterations) is written once to an .npy file. Our k-means++ picks the initial centroids
(timed on its own); all three methods start from them and run the same number of
iterations. Each method runs in a fresh subprocess, so its wall time and peak RSS are its
own: ours reads the memmap (zero-copy), faiss and scikit-learn get the array in memory
(loading is not timed). Times cover the Lloyd iterations plus the final assignment
(scikit-learn's ``fit`` does a last E-step; for faiss we add ``index.search``; faiss's
train-only time is reported too). The final inertia of every method is recomputed by one
evaluator (our ``assign``) from its final centroids.

Throughput mode (``--throughput``, implied by ``--device cuda``): ours only, reporting
effective TFLOP/s = iterations x 2·N·k·D / Lloyd time (dense E-step, the CUDA default;
``--allow-tf32`` for TF32 tensor cores), and checking the final assignment against a
brute-force nearest-centroid search.

Prints a markdown table; writes JSON to bench/results/ (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo is run from its root; `lib` is not installed

RESULTS = ROOT / "bench" / "results"


# -- data -----------------------------------------------------------------------------------
def make_data(path: Path, n: int, dim: int, seed: int, chunk: int = 100_000) -> None:
    """Blobs + noise, unit norm, float32, written chunk by chunk (with a sidecar)."""
    from lib.formats.arrays import ArraySpec, write_sidecar

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, dim), dtype=np.float32)
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, "w+", np.float32, (n, dim))
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        x = centres[rng.integers(0, len(centres), b - a)]
        x += 1.5 * rng.standard_normal((b - a, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[a:b] = x
    out.flush()
    del out
    os.replace(tmp, path)
    write_sidecar(path, ArraySpec((n, dim), "float32"))


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- workers (each in its own process) -----------------------------------------------------
def worker_init(args: argparse.Namespace) -> dict:
    import torch

    from lib.compute.comm import Comm
    from lib.formats.arrays import open_embeddings
    from lib.kmeans.params import KmeansParams
    from lib.kmeans.solver import PointSet, initial_centroids, make_rng, make_shard

    torch.set_num_threads(args.threads)
    points = PointSet(open_embeddings(args.data))
    params = KmeansParams(init=args.init, seed=args.seed)
    t0 = time.perf_counter()
    shard = make_shard(points, params, torch.device("cpu"), Comm.solo())
    c, _ = initial_centroids(shard, Comm.solo(), args.k, params, make_rng(args.seed))
    seconds = time.perf_counter() - t0
    np.save(args.out, c.numpy().astype(np.float32))
    return {"method": f"init ({args.init})", "seconds": seconds}


def worker_ours(args: argparse.Namespace) -> dict:
    import torch

    from lib.compute.distributed import process_group
    from lib.formats.arrays import open_embeddings
    from lib.kmeans.params import KmeansParams
    from lib.kmeans.solver import PointSet, kmeans

    torch.set_num_threads(args.threads)
    points = PointSet(open_embeddings(args.data))
    init = np.load(args.init_file) if args.init_file else None
    params = KmeansParams(
        n_iters=args.iters,
        seed=args.seed,
        init="random",
        bounds=args.bounds,
        allow_tf32=args.allow_tf32,
    )
    device = torch.device(args.device)
    with process_group(device) as env:
        base = rss_mb()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = kmeans(points, args.k, params, device=device, init_centroids=init)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out = {
            "method": "ours" + (f" ({env.world_size} ranks)" if env.world_size > 1 else ""),
            "rank": env.rank,
            "world_size": env.world_size,
            "seconds": seconds,
            "seconds_init": res.seconds.get("init"),
            "seconds_lloyd": res.seconds.get("lloyd"),
            "own_inertia": res.inertia,
            "iterations": res.n_iters,
            "rows": list(res.row_range),
            "rss_base_mb": base,
            "rss_peak_mb": peak_rss_mb(),
            "searched_fraction": float(np.mean([h["searched"] for h in res.history]) / points.n)
            if res.history
            else None,
        }
        if device.type == "cuda":
            out["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        if env.rank == 0:
            np.save(args.out, res.centroids)
            if args.throughput:
                out["check"] = _check_assignment(points, res)
    return out


def _check_assignment(points, res) -> str:
    """Brute-force nearest centroid (float64) on a sample of rows vs our assignment."""
    rng = np.random.default_rng(0)
    start, stop = res.row_range
    rows = np.sort(rng.choice(stop - start, size=min(2000, stop - start), replace=False))
    x = np.asarray(points.read(start, stop))[rows].astype(np.float64)
    d = ((x[:, None, :] - res.centroids[None]) ** 2).sum(-1)
    best = d.min(1)
    ours = d[np.arange(len(rows)), res.assignment[rows]]
    bad = int((ours > best * (1 + 1e-4) + 1e-6).sum())
    return "ok" if bad == 0 else f"{bad} of {len(rows)} rows not at their nearest centroid"


def worker_faiss(args: argparse.Namespace) -> dict:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    x = np.ascontiguousarray(np.load(args.data))
    init = np.load(args.init_file)
    base = rss_mb()
    km = faiss.Kmeans(
        x.shape[1],
        args.k,
        niter=args.iters,
        seed=args.seed,
        verbose=False,
        max_points_per_centroid=len(x),
        min_points_per_centroid=1,
    )
    t0 = time.perf_counter()
    km.train(x, init_centroids=init)
    t1 = time.perf_counter()
    km.index.search(x, 1)
    t2 = time.perf_counter()
    np.save(args.out, km.centroids.astype(np.float64))
    return {
        "method": "faiss.Kmeans",
        "seconds": t2 - t0,
        "seconds_train": t1 - t0,
        "own_inertia": float(km.obj[-1]),
        "iterations": args.iters,
        "rss_base_mb": base,
        "rss_peak_mb": peak_rss_mb(),
    }


def worker_sklearn(args: argparse.Namespace) -> dict:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    x = np.load(args.data)
    init = np.load(args.init_file)
    base = rss_mb()
    with threadpool_limits(args.threads):
        t0 = time.perf_counter()
        km = KMeans(args.k, init=init, n_init=1, max_iter=args.iters, tol=0, algorithm="lloyd")
        km.fit(x)
        seconds = time.perf_counter() - t0
    np.save(args.out, km.cluster_centers_.astype(np.float64))
    return {
        "method": "scikit-learn KMeans",
        "seconds": seconds,
        "own_inertia": float(km.inertia_),
        "iterations": int(km.n_iter_),
        "rss_base_mb": base,
        "rss_peak_mb": peak_rss_mb(),
    }


WORKERS = {
    "init": worker_init,
    "ours": worker_ours,
    "faiss": worker_faiss,
    "sklearn": worker_sklearn,
}


# -- driver -----------------------------------------------------------------------------------
def run_worker(
    name: str, args: argparse.Namespace, out: Path, ranks: int = 1, init_file: Path | None = None
) -> list[dict]:
    """Run a worker (``ranks`` processes for a distributed one); return their JSON lines."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--data",
        str(args.data),
        "--k",
        str(args.k),
        "--iters",
        str(args.iters),
        "--seed",
        str(args.seed),
        "--out",
        str(out),
        "--threads",
        str(max(1, args.threads // ranks)),
        "--device",
        args.device,
        "--init",
        args.init,
    ]
    if init_file is not None:
        cmd += ["--init-file", str(init_file)]
    if args.bounds is not None:
        cmd += ["--bounds", str(args.bounds).lower()]
    if args.allow_tf32:
        cmd.append("--allow-tf32")
    if args.throughput:
        cmd.append("--throughput")
    threads = str(max(1, args.threads // ranks))
    base_env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "PYTHONPATH": str(ROOT),
    }
    procs = []
    for r in range(ranks):
        env = dict(base_env)
        if ranks > 1:
            env.update(
                RANK=str(r),
                WORLD_SIZE=str(ranks),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(29400 + os.getpid() % 1000),
                LOCAL_RANK=str(r),
            )
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker {name} failed with exit code {p.returncode}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def evaluate(data: Path, centroids_file: Path) -> float:
    """Inertia of the given centroids on the data: one evaluator for every method."""
    import torch

    from lib.compute.comm import Comm
    from lib.formats.arrays import open_embeddings
    from lib.kmeans.solver import PointSet, assign

    torch.set_num_threads(os.cpu_count() or 1)
    _, sq, _ = assign(PointSet(open_embeddings(data)), np.load(centroids_file), comm=Comm.solo())
    return float(sq.sum())


def table(rows: list[dict], best: float | None) -> str:
    lines = [
        "| method | wall s (median) | vs faster baseline | inertia | vs best inertia | iterations "
        "| peak RSS MB (base) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else ""
        inertia = f"{r['inertia']:.2f}" if r.get("inertia") is not None else ""
        rel = f"{(r['inertia'] / best - 1) * 100:+.3f}%" if best and r.get("inertia") else ""
        rss = " / ".join(f"{m:.0f} ({b:.0f})" for m, b in r.get("rss", []))
        lines.append(
            f"| {r['method']} | {r['seconds']:.2f} | {ratio} | {inertia} | {rel} "
            f"| {r.get('iterations', '')} | {rss} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ranks", type=int, default=1, help="gloo ranks for ours (CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--init", default="kmeans++", choices=["kmeans++", "random"])
    ap.add_argument("--bounds", type=lambda s: s == "true", default=None)
    ap.add_argument("--allow-tf32", action="store_true")
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of: faiss,sklearn")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method (median reported)")
    ap.add_argument("--data-dir", type=Path, default=RESULTS / "data")
    # worker-only arguments
    ap.add_argument("--worker", choices=sorted(WORKERS))
    ap.add_argument("--data", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--init-file", type=Path)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    gpu = args.device.startswith("cuda")
    throughput = args.throughput or gpu
    args.throughput = throughput
    n = args.n or (1_000_000 if gpu else 200_000)
    dim = args.dim or (768 if gpu else 384)
    args.k = args.k or (10_000 if gpu else 1_000)
    if throughput and args.init == "kmeans++" and "--init" not in sys.argv:
        args.init = "random"  # the init is not what throughput mode measures
    args.data_dir.mkdir(parents=True, exist_ok=True)
    args.data = args.data_dir / f"blobs_{n}x{dim}_seed{args.seed}.npy"
    if not args.data.exists():
        print(f"writing {args.data} ...", file=sys.stderr)
        make_data(args.data, n, dim, args.seed)
    work = RESULTS / f"run_{int(time.time())}"
    work.mkdir(parents=True, exist_ok=True)

    # The init is the same for every method and does not depend on the run: cache it.
    init_file = args.data.with_name(f"{args.data.stem}_init_{args.init}_k{args.k}_s{args.seed}.npy")
    init_meta = init_file.with_suffix(".json")
    if init_file.exists() and init_meta.exists():
        init = json.loads(init_meta.read_text())
    else:
        (init,) = run_worker("init", args, init_file)
        init_meta.write_text(json.dumps(init))
    rows: list[dict] = []
    print(f"init {args.init}: {init['seconds']:.2f}s", file=sys.stderr)

    skip = set(filter(None, args.skip.split(","))) | ({"faiss", "sklearn"} if throughput else set())
    methods = ["ours"] + [m for m in ("faiss", "sklearn") if m not in skip]
    runs: dict[str, list[list[dict]]] = {m: [] for m in methods}
    for rep in range(args.repeat):  # interleaved, so load from elsewhere hits all alike
        for m in methods:
            ranks = args.ranks if m == "ours" else 1
            runs[m].append(run_worker(m, args, work / f"{m}.npy", ranks=ranks, init_file=init_file))
            print(f"rep {rep}: {m} {runs[m][-1][0]['seconds']:.2f}s", file=sys.stderr)
    for m in methods:
        first = runs[m][0]
        times = [r[0]["seconds"] for r in runs[m]]
        rows.append(
            {
                **first[0],
                "seconds": float(np.median(times)),
                "all_seconds": times,
                "rss": [(o["rss_peak_mb"], o["rss_base_mb"]) for o in first],
                "per_rank": first,
                "file": work / f"{m}.npy",
            }
        )
    for r in rows:
        r["inertia"] = evaluate(args.data, r.pop("file"))
    baselines = [r["seconds"] for r in rows[1:]]
    if baselines:
        for r in rows:
            r["ratio"] = r["seconds"] / min(baselines)
    best = min(r["inertia"] for r in rows)
    shard_mb = n * dim * 4 / args.ranks / 2**20
    header = (
        f"{n:,} x {dim} float32, k={args.k:,}, {args.iters} iterations, init={args.init} "
        f"({init['seconds']:.1f}s), {args.threads} threads, device={args.device}, "
        f"ours: {args.ranks} rank(s), shard {shard_mb:.0f} MB/rank"
    )
    print(header)
    print()
    print(table(rows, best))
    summary = {
        "config": {
            "n": n,
            "dim": dim,
            "k": args.k,
            "iters": args.iters,
            "threads": args.threads,
            "ranks": args.ranks,
            "device": args.device,
            "init": args.init,
            "init_seconds": init["seconds"],
            "command": shlex.join(sys.argv),
        },
        "results": rows,
    }
    if throughput:
        flops = args.iters * 2.0 * n * args.k * dim
        lloyd = float(np.median([r[0]["seconds_lloyd"] for r in runs["ours"]]))
        tflops = flops / lloyd / 1e12
        summary["effective_tflops"] = tflops
        print(
            f"\neffective {tflops:.3f} TFLOP/s ({args.iters} x 2·N·k·D / Lloyd "
            f"{lloyd:.2f}s); assignment check: {rows[0].get('check')}"
        )
    out = RESULTS / f"kmeans_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nresults: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
