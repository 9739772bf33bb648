"""Measuring the levels of a clustering on every rank of the current process group, for the
pipeline stage and for a named clustering alike."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from lib.compute.comm import Comm
from lib.config.fields import to_params, to_plain
from lib.config.redact import redact
from lib.core.errors import ConfigError
from lib.core.paths import MERGE_EMBEDDINGS, RunPaths
from lib.core.storage import expand_scratch
from lib.formats.arrays import open_embeddings
from lib.metrics.levels import (
    ClusteringInputs,
    LevelReport,
    MetricsOutput,
    flatten_levels,
    run_metrics_level,
    verify_inputs,
)
from lib.metrics.params import MetricsParams
from lib.metrics.tracking import make_tracker

log = logging.getLogger(__name__)


def metrics_params(cfg: DictConfig) -> MetricsParams:
    """The validated ``metrics`` node; applies ``metrics.torch_threads``."""
    params = to_params(cfg.metrics, MetricsParams)
    params.validate()
    if params.torch_threads:
        import torch

        torch.set_num_threads(int(params.torch_threads))
    return params


def merged_embeddings(paths: RunPaths) -> Path:
    """A local file of the merge stage's embeddings (safetensors preferred, else npy)."""
    for fmt in MERGE_EMBEDDINGS:
        name = paths.merge_embeddings(fmt)
        if paths.storage.exists(name):
            return paths.storage.local_path(name)
    raise ConfigError(
        f"{paths.url(paths.merge_embeddings())} (or .npy) does not exist; set "
        "clustering.embeddings to the embeddings this clustering was computed on"
    )


def merged_metadata(paths: RunPaths) -> Path | None:
    """A local file of the merge stage's ``metadata.parquet``, or None when there is none."""
    name = paths.merge_metadata
    return paths.storage.local_path(name) if paths.storage.exists(name) else None


def measure(
    cfg: DictConfig,
    inputs: ClusteringInputs,
    levels: list[int],
    out: MetricsOutput,
    hashes: dict[int, str],
    stages: dict[int, str] | None = None,
) -> list[LevelReport]:
    """Metrics of ``levels`` on every rank of the current process group; reports on rank 0.

    ``hashes``: each level's config hash (its marker carries it); ``stages``: the stage
    names of the markers (default ``metrics_level{L}``)."""
    comm = Comm.current()
    params = metrics_params(cfg)
    verify_inputs(inputs, levels, comm)
    n = open_embeddings(inputs.embeddings).shape[0]
    flat = flatten_levels(inputs.run, levels, n)
    scratch = expand_scratch(params.scratch_dir or cfg.cluster.scratch_dir)
    tracker = None
    if comm.is_root:
        tracker = make_tracker(
            cfg.tracking,
            out.storage.local_file(out.root),
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
                out,
                scratch_dir=scratch,
                config_hash=hashes[level],
                stage=(stages or {}).get(level),
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
