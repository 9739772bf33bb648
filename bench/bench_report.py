"""The report stage: its wall time on a curation-sized run, and the peak memory of its
streamed PCA against a load-everything baseline.

``report``: a synthetic run dir of ``--rows`` rows (default 63,000, the curation run's
size) x 384 laid out as the report reads it: ``run.yaml``/``plan.json`` composed from
``+experiment=curation``, ``merge/embeddings.npy`` (clustered unit vectors,
``bench/index_data.py``) with ``metadata.parquet`` (``--sources`` sources of unequal
sizes), ``quality_report.json``, ``dropped_rows.parquet``, two k-means levels
(``final.json`` + ``assignment.npy``: rows by their generating centre, then centres in
groups), ``metrics/level{1,2}/metrics.json`` + ``examples.json``, a curated subset
(``embedding_rows.npy``), stage markers, and the dataset itself (a parquet of texts) so
hover texts are read back as in a real run. Then ``lib.report.task.write_report`` runs in
a fresh process (``bench._util.child_peak_rss``): wall time and peak RSS of the whole
report (UMAP off, the default 50,000 map points).

``pca``: a ``--pca-rows`` x ``--pca-dim`` float32 .npy on disk (2.3 M x 1024 = 9.4 GB
by default; check ``df -h`` of ``--dir``). In fresh processes:

  * ``streamed``: ``streamed_moments`` (float64 D x D, rows by pread in blocks of
    ``report.block_rows``) + ``principal_components`` (the report's code);
  * ``baseline``: ``np.load`` of the whole file, then ``np.cov`` and ``eigh`` (what a
    notebook does), on the first ``--baseline-rows`` rows only when the whole would not
    fit in this machine's memory (its memory grows linearly in the rows: ~ 2 x 8 x N x D
    bytes for the float64 copy and the centred copy, + 4 N D for the load).

    .venv/bin/python bench/bench_report.py report [--rows 63000] [--dir /tmp/efbench-report] [--reuse]
    .venv/bin/python bench/bench_report.py pca [--pca-rows 2300000] [--pca-dim 1024]
        [--baseline-rows 300000] [--dir /tmp/efbench-report]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench._util import child_peak_rss, machine, save

WORDS = ["river", "mill", "fish", "kernel", "module", "compile", "bread", "flour", "yeast", "orchestra", "violin", "symphony", "market", "price", "trade", "planet", "orbit", "star", "garden", "seed", "flower"]  # fmt: skip


def make_run(root: Path, rows: int, dim: int, n_sources: int, seed: int = 0) -> Path:
    """The synthetic run dir (see the module doc); returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf

    from bench.index_data import ROWS_PER_CENTRE, clustered_unit_vectors
    from lib.config.compose import compose
    from lib.core.markers import CompletionMarker, write_marker
    from lib.core.paths import RunPaths
    from lib.formats.arrays import publish_npy, save_npy
    from lib.formats.parquet import publish_table
    from lib.plan.registry import build_plan

    rng = np.random.default_rng(seed)
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    # sources of unequal sizes (a few large, a long tail), rows in source order
    weights = 1.0 / np.arange(1, n_sources + 1)
    codes = np.sort(rng.choice(n_sources, size=rows, p=weights / weights.sum()))
    sources = np.array([f"source_{i:02d}" for i in range(n_sources)])[codes]
    texts = [
        " ".join(rng.choice(WORDS, size=int(rng.integers(8, 60)))) + f" row {i}"
        for i in range(rows)
    ]
    data = root / "dataset.parquet"
    ids = [f"doc{i}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "source": sources, "text": texts}), data)
    cfg = compose(
        [
            "+experiment=curation",
            "dataset=files",
            f"dataset.path={data}",
            f"run.root={root}",
            "run.name=run",
            "stages=[embed,merge,kmeans,curate,metrics,report]",
        ]
    )
    paths = RunPaths(run)
    paths.storage.publish_bytes(paths.run_config, OmegaConf.to_yaml(cfg).encode())
    plan = build_plan(cfg, rows)
    plan.save(paths)
    matrix = clustered_unit_vectors(rows, dim, seed=seed)
    (run / "merge").mkdir(exist_ok=True)
    save_npy(run / "merge" / "embeddings.npy", matrix)
    publish_table(
        paths.storage,
        paths.merge_metadata,
        pa.table({"row_index": np.arange(rows), "id": ids, "source": sources}),
    )
    dropped = pa.table(
        {
            "row_index": pa.array([], pa.int64()),
            "id": pa.array([], pa.string()),
            "source": pa.array([], pa.string()),
            "reason": pa.array([], pa.string()),
            "token_count": pa.array([], pa.int64()),
        }
    )
    publish_table(paths.storage, paths.merge_dropped, dropped)
    paths.storage.publish_json(paths.merge_report, {"shape": [rows, dim], "rows_dropped": 0})
    # level 1: the generating centre of each row (recomputed as its nearest centre);
    # level 2: level-1 clusters in groups of 10
    k1 = max(1, rows // ROWS_PER_CENTRE)
    centres = np.stack([matrix[i::k1][:50].mean(axis=0) for i in range(k1)])
    assign1 = np.concatenate(
        [np.argmax(matrix[a : a + 8192] @ centres.T, axis=1) for a in range(0, rows, 8192)]
    )
    k2 = max(1, k1 // 10)
    assign2 = np.arange(k1) % k2
    for level, assignment, k in ((1, assign1, k1), (2, assign2, k2)):
        step = paths.kmeans_step(level, "step0")
        publish_npy(paths.storage, step.array("assignment"), assignment.astype(np.int64))
        paths.storage.publish_json(paths.kmeans_final(level), {"step": "step0", "n_clusters": k})
        per_row = assign1 if level == 1 else assign2[assign1]
        sizes = np.bincount(per_row, minlength=k)
        paths.storage.publish_json(
            paths.metrics_file(level, "metrics.json"),
            {"n_points": rows, "n_clusters": k, "n_empty": int((sizes == 0).sum()),
             "inertia": 1.0, "davies_bouldin": 1.0, "calinski_harabasz": 1.0,
             "silhouette": 0.1, "silhouette_method": "sampled"},
        )  # fmt: skip
        examples = []
        for kind, order in (
            ("best_by_inertia", np.argsort(-sizes)),
            ("worst_by_inertia", np.argsort(sizes)),
        ):
            for rank, c in enumerate(order[:3], 1):
                members = np.flatnonzero(per_row == c)[:3]
                examples.append({"kind": kind, "rank": rank, "cluster": int(c), "size": int(sizes[c]),
                                 "rows": [{"row": int(r), "distance": 0.1} for r in members]})  # fmt: skip
        paths.storage.publish_json(paths.metrics_file(level, "examples.json"), examples)
    curated = np.sort(rng.choice(rows, size=min(rows, 10_000), replace=False))
    publish_npy(paths.storage, paths.curated_file("embedding_rows.npy"), curated)
    for spec in plan.stages:
        if spec.group == "report":
            continue
        for task in range(spec.num_tasks):
            marker = CompletionMarker(spec.name, task, spec.num_tasks, spec.config_hash,
                                      counts={"rows": rows // spec.num_tasks}, wall_seconds=10.0)  # fmt: skip
            write_marker(paths.storage, paths.marker(spec.stage_dir, task), marker)
    return run


REPORT_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from lib.config.compose import load_run_config
from lib.core.paths import RunPaths
from lib.plan.spec import Plan
from lib.report.plan import report_hash, report_params
from lib.report.task import write_report
paths = RunPaths(sys.argv[2])
t0 = time.perf_counter()
cfg = load_run_config(paths); plan = Plan.load(paths)
m = write_report(paths, cfg, plan, report_params(cfg), config_hash=report_hash(plan.stages))
import resource
ru = resource.getrusage(resource.RUSAGE_SELF)
print(time.perf_counter() - t0, m.counts["bytes"], ",".join(m.extra["sections"]), ru.ru_utime + ru.ru_stime)
"""

STREAMED_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from lib.formats.arrays import open_embeddings
from lib.report.pca import principal_components, streamed_moments
t0 = time.perf_counter()
m = open_embeddings(sys.argv[2])
m = m[: int(sys.argv[4])] if len(sys.argv) > 4 else m  # a prefix: still a memmap of the file
comps = principal_components(streamed_moments(m, int(sys.argv[3])), 50)
print(time.perf_counter() - t0, float(comps.explained[:10].sum()))
"""

BASELINE_CHILD = """
import sys, time
import numpy as np
t0 = time.perf_counter()
x = np.load(sys.argv[1], mmap_mode="r")[: int(sys.argv[2])]
x = np.array(x)  # load everything
cov = np.cov(x, rowvar=False)
values = np.linalg.eigh(cov)[0][::-1]
print(time.perf_counter() - t0, float(values[:10].sum() / values.sum()))
"""


def bench_report(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    run = Path(args.dir) / "run"
    if not (args.reuse and (run / "plan.json").exists()):
        run = make_run(Path(args.dir), args.rows, args.dim, args.sources)
    made = time.perf_counter() - t0
    wall, rss, out = child_peak_rss(
        [sys.executable, "-c", REPORT_CHILD, str(Path(__file__).parents[1]), str(run)]
    )
    seconds, size, sections, cpu = out.split()
    return {"rows": args.rows, "dim": args.dim, "sources": args.sources, "run_dir_made_s": round(made, 1),
            "report_s": round(float(seconds), 1), "process_wall_s": round(wall, 1),
            "process_cpu_s": round(float(cpu), 1), "load_average_1min": round(__import__("os").getloadavg()[0], 1),
            "peak_rss_mib": round(rss), "page_mib": round(int(size) / 2**20, 1), "sections": sections}  # fmt: skip


def bench_pca(args: argparse.Namespace) -> dict:
    from bench.index_data import clustered_unit_vectors

    path = Path(args.dir) / f"pca_{args.pca_rows}x{args.pca_dim}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        out = np.lib.format.open_memmap(
            path, mode="w+", dtype=np.float32, shape=(args.pca_rows, args.pca_dim)
        )
        for a in range(0, args.pca_rows, 262_144):
            b = min(args.pca_rows, a + 262_144)
            clustered_unit_vectors(b - a, args.pca_dim, seed=a, out=out[a:b])
        out.flush()
        del out
    repo = str(Path(__file__).parents[1])
    result = {
        "rows": args.pca_rows,
        "dim": args.pca_dim,
        "file_gib": round(path.stat().st_size / 2**30, 2),
    }
    wall, rss, out = child_peak_rss(
        [sys.executable, "-c", STREAMED_CHILD, repo, str(path), str(args.block_rows)]
    )
    result["streamed"] = {"rows": args.pca_rows, "wall_s": round(wall, 1), "peak_rss_mib": round(rss),
                          "top10_explained": float(out.split()[1]), "block_rows": args.block_rows}  # fmt: skip
    if args.baseline_rows:
        n = min(args.baseline_rows, args.pca_rows)
        wall, rss, out = child_peak_rss(
            [sys.executable, "-c", STREAMED_CHILD, repo, str(path), str(args.block_rows), str(n)]
        )
        result["streamed_at_baseline_rows"] = {
            "rows": n,
            "wall_s": round(wall, 1),
            "peak_rss_mib": round(rss),
            "top10_explained": float(out.split()[1]),
        }
        wall, rss, out = child_peak_rss([sys.executable, "-c", BASELINE_CHILD, str(path), str(n)])
        result["baseline"] = {"rows": n, "wall_s": round(wall, 1), "peak_rss_mib": round(rss),
                              "top10_explained": float(out.split()[1])}  # fmt: skip
    return result


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=["report", "pca"])
    p.add_argument("--rows", type=int, default=63_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--sources", type=int, default=24)
    p.add_argument("--pca-rows", type=int, default=2_300_000)
    p.add_argument("--pca-dim", type=int, default=1024)
    p.add_argument("--baseline-rows", type=int, default=300_000)
    p.add_argument("--block-rows", type=int, default=8192)
    p.add_argument("--dir", default="/tmp/efbench-report")
    p.add_argument("--reuse", action="store_true", help="report: keep a run dir made before")
    args = p.parse_args()
    result = bench_report(args) if args.what == "report" else bench_pca(args)
    result["command"] = shlex.join([sys.executable, *sys.argv])
    result["machine"] = machine()
    print(json.dumps(result, indent=2))
    save(f"report_{args.what}", result)


if __name__ == "__main__":
    main()
