"""The index stage's faiss build and search on synthetic unit vectors: flat vs ivf_flat vs
hnsw, with recall@10 against exact search and the peak RSS of the streamed build vs a
load-everything baseline.

Data: ``--rows`` x ``--dim`` clustered unit vectors (``bench/index_data.py``) written as
an .npy file, and ``--queries`` unit queries near them (not stored rows). Each build runs
in a fresh process (``bench._util.child_peak_rss``: its peak RSS is its own):

  * ``streamed``: what the index stage runs (``lib.index``): ``open_embeddings`` +
    ``MatrixReader`` (pread, chunks of 65,536 rows), ``build_index`` with the stage's
    default settings for the kind (nlist ~4 sqrt(N), 40 training vectors a list, nprobe
    nlist/16; HNSW M 32, efConstruction 40, efSearch 128; the runs of 2026-12-03 used 64), ``faiss.write_index``; then the
    queries: batched (``--batch`` queries a call, p50/p99 of the calls' latency and
    queries/s) and one at a time (``--single`` queries: p50/p99 per query);
  * ``baseline``: ``index.add(np.load(path))`` (the IVF one trained on the same sample).

Peak RSS: ``build_peak_rss_mib`` is the process's high-water mark right after the build
(and ``write_index``), before any query; ``peak_rss_mib`` the whole process's, queries
included.

Recall@10 of each kind against the flat index's exact top 10 of the same queries.
``--hnsw-rows`` builds HNSW on the first N rows only (its build is the slow one on a
small machine); its recall is then against exact search over those N rows.

    .venv/bin/python bench/bench_index.py [--rows 1000000] [--dim 384] [--kinds flat,ivf_flat,hnsw]
        [--queries 1000] [--single 1000] [--hnsw-rows N] [--dir /tmp/efbench-index]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench._util import REPO, child_peak_rss, machine, save
from bench.index_data import clustered_unit_vectors, queries_near, recall_at_k

CHUNK_ROWS = 65536


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_streamed(args: argparse.Namespace) -> None:
    """One streamed build and its queries; results to ``args.out`` (JSON + ids .npy)."""
    import faiss

    from lib.formats.arrays import open_embeddings
    from lib.formats.matrix_reader import MatrixReader
    from lib.index.build import build_index
    from lib.index.choice import choose_layout
    from lib.index.params import IndexParams

    matrix = open_embeddings(args.data)
    reader = MatrixReader(matrix)
    if args.limit:
        reader.rows = min(reader.rows, args.limit)
    layout = choose_layout(IndexParams(kind=args.kind), reader.rows, reader.dim, "ip")
    t0 = time.perf_counter()
    index = build_index(layout, reader, seed=0, chunk_rows=CHUNK_ROWS)
    build_s = time.perf_counter() - t0
    faiss.write_index(index, str(Path(args.out).with_suffix(".faiss")))
    build_rss_mib = _peak_rss_mib()  # before any query: the build's own peak
    queries = np.load(args.queries)
    batch_times, ids = [], []
    for a in range(0, len(queries), args.batch):
        t = time.perf_counter()
        _, found = index.search(queries[a : a + args.batch], 10)
        batch_times.append(time.perf_counter() - t)
        ids.append(found)
    single_times = []
    for q in queries[: args.single]:
        t = time.perf_counter()
        index.search(q[None, :], 10)
        single_times.append(time.perf_counter() - t)
    np.save(Path(args.out).with_suffix(".ids.npy"), np.concatenate(ids))
    result = {
        "layout": layout.to_json(),
        "build_s": build_s,
        "build_peak_rss_mib": build_rss_mib,
        "batched": {
            "batch": args.batch,
            "calls": len(batch_times),
            **_percentiles(batch_times),
            "queries_per_s": len(queries) / sum(batch_times),
        },
        "single": {"queries": len(single_times), **_percentiles(single_times)},
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    Path(args.out).write_text(json.dumps(result))


def child_baseline(args: argparse.Namespace) -> None:
    """``index.add(np.load(...))``: the whole matrix in memory beside the index."""
    from lib.index.build import make_index, training_rows
    from lib.index.choice import choose_layout
    from lib.index.params import IndexParams

    t0 = time.perf_counter()
    x = np.load(args.data)
    layout = choose_layout(IndexParams(kind=args.kind), len(x), x.shape[1], "ip")
    index = make_index(layout)
    if layout.is_ivf:
        index.train(x[training_rows(len(x), layout.train_size, 0)])
    index.add(x)
    build_s = time.perf_counter() - t0
    out = {"build_s": build_s, "build_peak_rss_mib": _peak_rss_mib()}
    Path(args.out).write_text(json.dumps(out))


def _child(mode: str, kind: str, work: Path, args: argparse.Namespace, limit: int = 0):
    out = work / f"{mode}-{kind}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--kind",
        kind,
        "--data",
        str(work / "embeddings.npy"),
        "--queries",
        str(work / "queries.npy"),
        "--out",
        str(out),
        "--batch",
        str(args.batch),
        "--single",
        str(args.single),
        "--limit",
        str(limit),
    ]
    print(f"$ {shlex.join(cmd)}", flush=True)
    wall, rss_mib, _ = child_peak_rss(cmd)
    result = json.loads(out.read_text())
    result.update(wall_s=wall, peak_rss_mib=rss_mib)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--kinds", default="flat,ivf_flat,hnsw")
    p.add_argument("--queries", default=1000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--single", type=int, default=1000)
    p.add_argument("--hnsw-rows", type=int, default=0)
    p.add_argument("--baseline", default="flat,ivf_flat")
    p.add_argument("--dir", type=Path, default=Path("/tmp/efbench-index"))
    p.add_argument("--name", default="index")
    p.add_argument("--child", choices=["streamed", "baseline"])
    p.add_argument("--kind")
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--limit", type=int, default=0)
    args = p.parse_args()
    if args.child == "streamed":
        return child_streamed(args)
    if args.child == "baseline":
        return child_baseline(args)
    n_queries = int(args.queries)
    work = args.dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t = time.perf_counter()
    data = np.lib.format.open_memmap(
        work / "embeddings.npy", mode="w+", dtype=np.float32, shape=(args.rows, args.dim)
    )
    clustered_unit_vectors(args.rows, args.dim, seed=0, out=data)
    data.flush()
    np.save(work / "queries.npy", queries_near(data, n_queries, seed=1))
    print(f"data: {args.rows} x {args.dim} in {time.perf_counter() - t:.1f}s", flush=True)
    kinds = [k for k in args.kinds.split(",") if k]
    results: dict[str, dict] = {}
    for kind in kinds:
        limit = args.hnsw_rows if kind == "hnsw" else 0
        results[kind] = _child("streamed", kind, work, args, limit)
    truth_full = np.load(work / "streamed-flat.ids.npy") if "flat" in results else None
    for kind, r in results.items():
        limit = r["layout"]["rows"]
        if limit == args.rows and truth_full is not None:
            truth = truth_full
        else:  # exact top 10 over the rows this index holds
            import faiss

            exact = faiss.IndexFlatIP(args.dim)
            exact.add(np.load(work / "embeddings.npy", mmap_mode="r")[:limit])
            _, truth = exact.search(np.load(work / "queries.npy"), 10)
        r["recall_at_10"] = recall_at_k(np.load(work / f"streamed-{kind}.ids.npy"), truth)
        print(f"{kind}: recall@10 {r['recall_at_10']:.4f}", flush=True)
    baselines = {}
    for kind in [k for k in args.baseline.split(",") if k]:
        baselines[kind] = _child("baseline", kind, work, args)
    payload = {
        "command": shlex.join([".venv/bin/python", "bench/bench_index.py", *sys.argv[1:]]),
        "rows": args.rows,
        "dim": args.dim,
        "queries": n_queries,
        "streamed": results,
        "baseline": baselines,
        "matrix_mib": args.rows * args.dim * 4 / 2**20,
    }
    path = save(args.name, payload)
    print(f"saved {path.relative_to(REPO)}")
    print(machine())


if __name__ == "__main__":
    main()
