"""Cluster metrics: a pipeline stage, or a standalone run on a named clustering.

    python -m jobs.metrics CLUSTER [KEY=VALUE ...]          all levels of CLUSTER
    python -m jobs.metrics CLUSTER --sanity-check           compare with scikit-learn
    python -m jobs.metrics --list                           the clusterings that exist
    srun python -m jobs.metrics CLUSTER                     one rank per SLURM task
    python -m jobs.metrics --run-dir RUN --stage metrics_level1   (what launch.py runs)

CLUSTER is a config of the ``clustering`` group (conf/clustering/CLUSTER.yaml) or the
name of a run under ``run.root`` with kmeans/ output. KEY=VALUE are Hydra overrides of
conf/ (``metrics.sample_size=5000``, ``tracking=wandb``, ``run.root=/scratch/runs``).
Rank and world size come from RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS.
Outputs: ``<output_dir>/level{L}/{metrics.json, per_cluster.parquet, examples.json}``,
``output_dir`` defaulting to ``<clustering run_dir>/metrics``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from jobs._common import JobContext, run_job, setup_logging
from lib.clustering import (
    CONF_DIR,
    clustering_inputs,
    configured_clusterings,
    merged_embeddings,
    runs_with_kmeans,
    unknown_clustering,
)
from lib.config import redact, register_configs, to_plain
from lib.errors import EmbedfleetError
from lib.kmeans_points import Comm
from lib.markers import CompletionMarker, describe_outputs, write_marker
from lib.metrics_levels import (
    ClusteringInputs,
    LevelReport,
    find_levels,
    flatten_levels,
    params_from_config,
    run_metrics_level,
    scratch_root,
)
from lib.tracking import make_tracker

log = logging.getLogger("embedfleet")


# -- configuration ------------------------------------------------------------------------
def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="metrics"):
        cfg = hydra_compose("config", overrides=overrides)
    # run.dir is Hydra's output dir, which only exists under @hydra.main: pin it.
    cfg.run.dir = str(Path(str(cfg.run.root)) / str(cfg.run.name))
    return cfg


def resolve_clustering(cluster: str, overrides: list[str]) -> DictConfig:
    """Compose conf/ for CLUSTER: ``clustering=CLUSTER`` when conf/clustering has it, else
    the run ``run.root/CLUSTER`` when it has kmeans/ output; else ``ConfigError`` listing
    both kinds that exist."""
    if cluster in configured_clusterings():
        return compose([f"clustering={cluster}", *overrides])
    cfg = compose(overrides)
    root = Path(str(cfg.run.root))
    if cluster in runs_with_kmeans(root):
        cfg.clustering.name = cluster
        cfg.clustering.run_dir = str(root / cluster)
        return cfg
    raise unknown_clustering(cluster, root)


def _threads(cfg: DictConfig) -> None:
    if cfg.metrics.torch_threads:
        torch.set_num_threads(int(cfg.metrics.torch_threads))


# -- running ------------------------------------------------------------------------------
def measure(
    cfg: DictConfig, inputs: ClusteringInputs, levels: list[int], out_dir: Path
) -> list[LevelReport]:
    """Metrics of ``levels`` on every rank of the current process group; reports on rank 0."""
    comm = Comm.current()
    params = params_from_config(cfg.metrics)
    from lib.arrays import open_embeddings

    n = open_embeddings(inputs.embeddings).shape[0]
    flat = flatten_levels(inputs.run_dir, levels, n)
    scratch = scratch_root(cfg.metrics.scratch_dir or cfg.cluster.scratch_dir)
    tracker = None
    if comm.is_root:
        tracker = make_tracker(
            cfg.tracking,
            out_dir,
            inputs.name,
            redact({"clustering": inputs.name, "metrics": to_plain(cfg.metrics)}),
        )
    reports = []
    try:
        for level in levels:
            labels, k = flat[level]
            log.info("level %d: %d points, k=%d, %d rank(s)", level, len(labels), k, comm.world)
            rep = run_metrics_level(
                inputs,
                level,
                labels,
                k,
                params,
                out_dir,
                scratch_dir=scratch,
                n_examples=int(cfg.metrics.n_examples),
                n_show=int(cfg.metrics.n_show),
                comm=comm,
            )
            if rep is not None:
                reports.append(rep)
                tracker.log_level(level, rep.scalars, rep.per_cluster, rep.examples)
    finally:
        if tracker is not None:
            tracker.finish()
    return reports


def print_summary(reports: list[LevelReport]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Cluster metrics")
    cols = [
        ("level", "{}"),
        ("n_points", "{}"),
        ("n_clusters", "{}"),
        ("n_empty", "{}"),
        ("inertia", "{:.6g}"),
        ("davies_bouldin", "{:.6f}"),
        ("calinski_harabasz", "{:.6g}"),
        ("silhouette", "{:.6f}"),
        ("silhouette_method", "{}"),
        ("simplified_silhouette", "{:.6f}"),
    ]
    for name, _ in cols:
        table.add_column(name, justify="right")
    for r in reports:
        table.add_row(*[fmt.format(r.scalars[c]) if c in r.scalars else "-" for c, fmt in cols])
    Console(file=sys.stdout, width=200).print(table)
    for r in reports:
        print(f"level {r.level}: {r.out_dir}")


def standalone(args: argparse.Namespace) -> int:
    from lib.distributed import process_group

    cfg = resolve_clustering(args.cluster, args.overrides)
    if args.sanity_check:
        cfg.metrics.sanity_check = True
    _threads(cfg)
    inputs = clustering_inputs(cfg)
    levels = list(cfg.metrics.levels) if cfg.metrics.levels else find_levels(inputs.run_dir)
    if not levels:
        raise EmbedfleetError(f"{inputs.run_dir / 'kmeans'} has no finished level (final.json)")
    if cfg.metrics.sanity_check:
        from lib.distributed import resolve_dist_env

        if resolve_dist_env().rank != 0:
            return 0  # the sanity check runs in one process
        from lib.metrics_sanity import sanity_check

        ok = sanity_check(cfg, inputs, levels)
        return 0 if ok else 1
    out_dir = (
        Path(str(cfg.metrics.output_dir))
        if cfg.metrics.output_dir
        else (inputs.run_dir / "metrics")
    )
    t = time.perf_counter()
    with process_group():
        reports = measure(cfg, inputs, levels, out_dir)
    if reports:
        print_summary(reports)
        log.info("metrics of %d level(s) in %.1fs", len(reports), time.perf_counter() - t)
    return 0


# -- the pipeline stage -------------------------------------------------------------------
def stage_body(ctx: JobContext) -> None:
    from lib.distributed import process_group

    _threads(ctx.cfg)
    level = int(ctx.spec.name.removeprefix("metrics_level"))
    run_dir = ctx.run_dir
    inputs = ClusteringInputs(
        name=str(ctx.cfg.run.name),
        run_dir=run_dir,
        embeddings=merged_embeddings(run_dir),
        metadata=(run_dir / "merge" / "metadata.parquet")
        if (run_dir / "merge" / "metadata.parquet").exists()
        else None,
        text_field=str(ctx.cfg.clustering.text_field),
    )
    t = time.perf_counter()
    with process_group():
        reports = measure(ctx.cfg, inputs, [level], run_dir / "metrics")
    if reports:
        rep = reports[0]
        outputs = [
            rep.out_dir / n for n in ("metrics.json", "per_cluster.parquet", "examples.json")
        ]
        write_marker(
            run_dir,
            ctx.spec.stage_dir,
            CompletionMarker(
                stage=ctx.spec.name,
                task=ctx.identity.task_index,
                num_tasks=ctx.spec.num_tasks,
                config_hash=ctx.spec.config_hash,
                counts={"points": int(rep.scalars["n_points"]), "clusters": int(rep.scalars["k"])},
                outputs=describe_outputs(run_dir, outputs),
                extra={k: v for k, v in rep.scalars.items() if isinstance(v, int | float)},
                wall_seconds=time.perf_counter() - t,
            ),
        )
        print_summary(reports)


# -- entry point --------------------------------------------------------------------------
def parse_standalone(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.metrics",
        description="Cluster metrics (inertia, Davies-Bouldin, Calinski-Harabasz, silhouette, "
        "per-cluster table, best/worst clusters) of every level of a clustering. CLUSTER is "
        "conf/clustering/CLUSTER.yaml or a run under run.root with kmeans/ output. Ranks come "
        "from RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS (srun). As a pipeline stage: "
        "--run-dir RUN --stage metrics_level{L}.",
        epilog="Examples:\n  python -m jobs.metrics quickstart\n"
        "  python -m jobs.metrics myrun run.root=/scratch/runs metrics.sample_size=5000\n"
        "  python -m jobs.metrics myrun tracking=wandb\n"
        "  python -m jobs.metrics myrun --sanity-check\n"
        "  sbatch jobs/metrics.slurm myrun",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("cluster", nargs="?", metavar="CLUSTER", help="the clustering to measure")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides of conf/")
    p.add_argument(
        "--sanity-check",
        action="store_true",
        help="one process: compute every metric on a small random sample and compare with "
        "scikit-learn (metrics.sanity_sample rows, metrics.sanity_rtol); exit 1 on a mismatch",
    )
    p.add_argument("--list", action="store_true", help="list the clusterings that exist")
    args = p.parse_intermixed_args(argv)
    if not args.list and not args.cluster:
        p.error("CLUSTER is required (see --list)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith(("--run-dir", "--stage", "--task-index")) for a in argv):
        return run_job("metrics", stage_body, argv)
    args = parse_standalone(argv)
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    setup_logging(f"metrics r{rank}")
    try:
        if args.list:
            cfg = compose(args.overrides + ([args.cluster] if args.cluster else []))
            print("configured (conf/clustering):", ", ".join(configured_clusterings()) or "none")
            print(
                f"runs with kmeans/ under {cfg.run.root}:",
                ", ".join(runs_with_kmeans(str(cfg.run.root))) or "none",
            )
            return 0
        return standalone(args)
    except EmbedfleetError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
