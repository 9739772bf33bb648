"""Metrics of a named clustering, outside a pipeline: ``python -m jobs.metrics CLUSTER``.

A clustering is either a config of the ``clustering`` group (``conf/clustering/NAME.yaml``)
or the name of a run under ``run.root`` that has ``kmeans/`` output. Scripts name
clusterings, never paths (``sbatch jobs/metrics.slurm CLUSTER``). Rank and world size come
from the task environment (RANK/WORLD_SIZE, or SLURM_PROCID/SLURM_NTASKS under srun).

Hydra composition is handed in (``compose``) by the entry point: stage packages never
load the schema themselves.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from lib.compute.distributed import process_group, resolve_dist_env
from lib.core.errors import ConfigError, EmbedfleetError
from lib.core.paths import KMEANS_DIR, METRICS_DIR, RunPaths
from lib.core.repo import CONF_DIR
from lib.core.storage import LocalStorage
from lib.formats.clusters import find_levels, level_marker
from lib.metrics.levels import ClusteringInputs, MetricsOutput
from lib.metrics.measure import measure, merged_embeddings, metrics_params, print_summary
from lib.metrics.plan import metrics_hash
from lib.runtime.logs import exit_code, setup_logging

log = logging.getLogger("embedfleet")

Compose = Callable[[list[str]], DictConfig]


def configured_clusterings(conf_dir: Path = CONF_DIR) -> list[str]:
    """Names of ``conf/clustering/*.yaml``."""
    return sorted(p.stem for p in (conf_dir / "clustering").glob("*.yaml"))


def runs_with_kmeans(root: str | Path) -> list[str]:
    """Run names under ``root`` with a ``kmeans/`` directory."""
    r = Path(root)
    if not r.is_dir():
        return []
    return sorted(p.name for p in r.iterdir() if (p / KMEANS_DIR).is_dir())


def unknown_clustering(name: str, root: str | Path, conf_dir: Path = CONF_DIR) -> ConfigError:
    configured = configured_clusterings(conf_dir)
    runs = runs_with_kmeans(root)
    return ConfigError(
        f"unknown clustering {name!r}. Configured clusterings ({conf_dir / 'clustering'}): "
        f"{', '.join(configured) or 'none'}. Runs with kmeans/ output under run.root={root}: "
        f"{', '.join(runs) or 'none'}. Add conf/clustering/{name}.yaml (run_dir: ...) or "
        "pass the name of a run above (and run.root=... if it lives elsewhere)"
    )


def clustering_inputs(cfg: DictConfig) -> ClusteringInputs:
    """Resolve ``cfg.clustering`` to paths, checking they exist."""
    c = cfg.clustering
    if not c.run_dir:
        raise ConfigError(
            "no clustering given: pass CLUSTER (python -m jobs.metrics CLUSTER) or "
            "clustering=NAME / clustering.run_dir=PATH"
        )
    run = RunPaths(str(c.run_dir))
    if not run.storage.exists(KMEANS_DIR):
        raise ConfigError(
            f"clustering {c.name or run.root}: {run.url(KMEANS_DIR)} does not exist; run the "
            "kmeans stage for that run first or fix clustering.run_dir"
        )
    emb = Path(str(c.embeddings)) if c.embeddings else merged_embeddings(run)
    if not emb.exists():
        raise ConfigError(f"clustering {c.name}: embeddings {emb} do not exist")
    if c.metadata:
        meta: Path | None = Path(str(c.metadata))
        if not meta.exists():
            raise ConfigError(f"clustering {c.name}: metadata {meta} does not exist")
    else:
        name = run.merge_metadata
        meta = run.storage.local_path(name) if run.storage.exists(name) else None
    return ClusteringInputs(str(c.name or Path(run.root).name), run, emb, meta, str(c.text_field))


def resolve_clustering(cluster: str, overrides: list[str], compose: Compose) -> DictConfig:
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


def standalone(args: argparse.Namespace, compose: Compose) -> int:
    cfg = resolve_clustering(args.cluster, args.overrides, compose)
    if args.sanity_check:
        cfg.metrics.sanity_check = True
    params = metrics_params(cfg)
    inputs = clustering_inputs(cfg)
    levels = list(params.levels) if params.levels else find_levels(inputs.run)
    if not levels:
        raise EmbedfleetError(f"{inputs.run.url(KMEANS_DIR)} has no finished level")
    if params.sanity_check:
        if resolve_dist_env().rank != 0:
            return 0  # the sanity check runs in one process
        from lib.metrics.sanity import sanity_check

        return 0 if sanity_check(cfg, inputs, levels) else 1
    if params.output_dir:
        out = MetricsOutput(LocalStorage(Path(str(params.output_dir))))
    else:
        out = MetricsOutput(inputs.run.storage, METRICS_DIR)
    hashes = {}
    for level in levels:
        marker = level_marker(inputs.run, level)
        hashes[level] = metrics_hash(params, level, marker.config_hash if marker else "")
    t = time.perf_counter()
    with process_group():
        reports = measure(cfg, inputs, levels, out, hashes)
    if reports:
        print_summary(reports)
        log.info("metrics of %d level(s) in %.1fs", len(reports), time.perf_counter() - t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.metrics",
        description="Cluster metrics (inertia, Davies-Bouldin, Calinski-Harabasz, silhouette, "
        "per-cluster table, best/worst clusters) of every level of a clustering. CLUSTER is "
        "conf/clustering/CLUSTER.yaml or a run under run.root with kmeans/ output. Ranks come "
        "from RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS (srun). The pipeline stage's job "
        "is `python -m jobs.metrics_level`.",
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
    return p


def main(argv: list[str] | None, compose: Compose) -> int:
    """The named-clustering command line; returns the exit code."""
    p = build_parser()
    args = p.parse_intermixed_args(argv)
    if not args.list and not args.cluster:
        p.error("CLUSTER is required (see --list)")
    rank = resolve_dist_env().rank
    setup_logging(f"metrics r{rank}")
    return exit_code(lambda: _list(args, compose) if args.list else standalone(args, compose), log)


def _list(args: argparse.Namespace, compose: Compose) -> int:
    cfg = compose(args.overrides + ([args.cluster] if args.cluster else []))
    print("configured (conf/clustering):", ", ".join(configured_clusterings()) or "none")
    print(
        f"runs with kmeans/ under {cfg.run.root}:",
        ", ".join(runs_with_kmeans(str(cfg.run.root))) or "none",
    )
    return 0
