"""k-means throughput on the GPU: 1M x 768 float32 points, k = 10,000, 20 Lloyd iterations
from the same random initial centroids, in effective TFLOP/s (iterations x 2*N*k*D / time:
the dense E-step), with fp32 products and with TF32, against the GPU's measured fp32/TF32
matmul rate, and against faiss-gpu's ``Kmeans`` when faiss has GPU support.

    python -m bench.gpu.kmeans --out results/kmeans.json [--n 1000000 --dim 768 --k 10000]
"""

from __future__ import annotations

import numpy as np
import torch

from bench.gpu.common import device, gpu_name, matmul_peak, parser, row, timed, write
from lib.kmeans.params import KmeansParams
from lib.kmeans.solver import PointSet, kmeans


def data(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 2,000 random directions (embedding-like, not converging fast)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(2000, dim, generator=g)
    x = centers[torch.randint(0, 2000, (n,), generator=g)] + 2.0 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1).numpy()


def ours(x: np.ndarray, init: np.ndarray, iters: int, dev: torch.device, tf32: bool):
    params = KmeansParams(n_iters=iters, tol=0.0, allow_tf32=tf32, save_distances=False)
    return kmeans(PointSet(x), len(init), params, device=dev, init_centroids=init)


def faiss_gpu(x: np.ndarray, init: np.ndarray, iters: int) -> float | None:
    """Seconds of faiss-gpu's Kmeans from the same centroids, or None without GPU faiss."""
    try:
        import faiss
    except ImportError:
        return None
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return None
    km = faiss.Kmeans(
        x.shape[1], len(init), niter=iters, gpu=True, seed=0, max_points_per_centroid=1 << 30
    )
    t0 = __import__("time").perf_counter()
    km.train(x, init_centroids=init)
    return __import__("time").perf_counter() - t0


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=10_000)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if args.smoke:
        args.n, args.dim, args.k, args.iters = 2000, 16, 20, 2
    dev = device(args.smoke)
    x = data(args.n, args.dim)
    init = x[np.random.default_rng(0).choice(args.n, args.k, replace=False)].copy()
    flop = args.iters * 2.0 * args.n * args.k * args.dim
    rows = []
    inertia = {}
    for tf32 in (False, True):
        ours(x[: min(args.n, 50_000)], init[: min(args.k, 1000)], 1, dev, tf32)  # warm-up
        seconds, res = timed(lambda tf32=tf32: ours(x, init, args.iters, dev, tf32), dev)
        name = "TF32" if tf32 else "fp32"
        inertia[name] = float(res.inertia)
        rows.append(row("kmeans", f"ours, {name} products", flop / seconds / 1e12, "TFLOP/s",
                        f"{seconds:.1f} s incl. transfer"))  # fmt: skip
    rows.append(row("kmeans", "inertia TF32 / fp32", inertia["TF32"] / inertia["fp32"], ""))
    if dev.type == "cuda":
        for name, dtype, tf32 in (("fp32", torch.float32, False), ("TF32", torch.float32, True),
                                  ("bf16", torch.bfloat16, False)):  # fmt: skip
            peak = matmul_peak(dev, dtype, tf32=tf32)
            rows.append(row("kmeans", f"{name} matmul peak (measured)", peak, "TFLOP/s"))
        for r in rows[:2]:
            name = "TF32" if "TF32" in r["what"] else "fp32"
            peak = next(p["value"] for p in rows if p["what"] == f"{name} matmul peak (measured)")
            rows.append(row("kmeans", f"ours {name} / its matmul peak", r["value"] / peak, ""))
        faiss_s = faiss_gpu(x, init, args.iters)
        rows.append(
            row("kmeans", "faiss-gpu Kmeans", None if faiss_s is None else flop / faiss_s / 1e12,
                "TFLOP/s", "not installed (faiss-gpu)" if faiss_s is None else f"{faiss_s:.1f} s")
        )  # fmt: skip
    write(args.out, rows, gpu=gpu_name(dev), n=args.n, dim=args.dim, k=args.k, iters=args.iters)


if __name__ == "__main__":
    main()
