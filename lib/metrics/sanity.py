"""``python -m jobs.metrics CLUSTER --sanity-check``: every metric on a small random sample
in one process, compared with scikit-learn; any relative difference above
``metrics.sanity_rtol`` is a failure (printed, exit 1)."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
from omegaconf import DictConfig

from lib.compute.comm import Comm
from lib.config.fields import to_params
from lib.formats.arrays import open_embeddings
from lib.metrics.blocks import ClusterMetricsError
from lib.metrics.compute import compute_metrics
from lib.metrics.levels import ClusteringInputs, flatten_levels
from lib.metrics.params import MetricsParams

log = logging.getLogger(__name__)


def sklearn_reference(X: np.ndarray, labels: np.ndarray, seed: int, sample: int) -> dict:
    """scikit-learn's values (inertia: squared distances to the cluster means, float64)."""
    from sklearn import metrics as skm

    X64 = X.astype(np.float64)
    inertia = 0.0
    for c in np.unique(labels):
        pts = X64[labels == c]
        inertia += float(((pts - pts.mean(0)) ** 2).sum())
    return {
        "inertia": inertia,
        "davies_bouldin": float(skm.davies_bouldin_score(X, labels)),
        "calinski_harabasz": float(skm.calinski_harabasz_score(X, labels)),
        "silhouette": float(skm.silhouette_score(X, labels)),
        "silhouette_sampled": float(
            skm.silhouette_score(X, labels, sample_size=sample, random_state=seed)
        ),
    }


def compare(ours: dict, ref: dict, rtol: float) -> list[tuple[str, float, float, float, bool]]:
    rows = []
    for key, want in ref.items():
        got = float(ours[key])
        rel = abs(got - want) / max(abs(want), 1e-300)
        rows.append((key, got, want, rel, rel <= rtol or got == want))
    return rows


def sanity_check(cfg: DictConfig, inputs: ClusteringInputs, levels: list[int]) -> bool:
    """Run the check on every level; print a table; True when everything agrees."""
    from rich.console import Console
    from rich.table import Table

    params = to_params(cfg.metrics, MetricsParams)
    params.validate()
    X = open_embeddings(inputs.embeddings)
    n = X.shape[0]
    m = min(int(params.sanity_sample), n)
    rng = np.random.RandomState(int(params.seed))
    rows = np.sort(rng.choice(n, size=m, replace=False))
    Xs = np.asarray(X[rows])
    flat = flatten_levels(inputs.run, levels, n)
    rtol = float(params.sanity_rtol)
    table = Table(title=f"Sanity check: {inputs.name}, {m} random rows, rtol={rtol:g}")
    for col in ("level", "metric", "embedfleet", "scikit-learn", "rel. diff", "ok"):
        table.add_column(col, justify="right")
    ok = True
    for level in levels:
        labels_all, k = flat[level]
        labels = labels_all[rows]
        if len(np.unique(labels)) < 2:
            table.add_row(str(level), "-", "-", "-", "-", "skipped: 1 cluster in the sample")
            continue
        half = max(2, m // 2)
        exact = replace(params, silhouette_exact_max=m)
        sampled = replace(params, silhouette_exact_max=1, sample_size=half)
        try:
            ours = compute_metrics(Xs, labels, k, exact, comm=Comm.solo(), progress=lambda _: None)
            ours_s = compute_metrics(
                Xs, labels, k, sampled, comm=Comm.solo(), progress=lambda _: None
            )
        except ClusterMetricsError as exc:
            table.add_row(str(level), "-", "-", "-", "-", f"skipped: {exc}")
            continue
        values = {**ours.scalars, "silhouette_sampled": ours_s.scalars["silhouette"]}
        ref = sklearn_reference(Xs, labels, params.seed, half)
        for key, got, want, rel, good in compare(values, ref, rtol):
            ok &= good
            table.add_row(
                str(level), key, f"{got:.10g}", f"{want:.10g}", f"{rel:.2e}",
                "ok" if good else "[bold red]MISMATCH[/]",
            )  # fmt: skip
    Console(width=200).print(table)
    if ok:
        log.info("sanity check passed: every metric agrees with scikit-learn within %g", rtol)
    else:
        log.error("SANITY CHECK FAILED: a metric differs from scikit-learn by more than %g", rtol)
    return ok
