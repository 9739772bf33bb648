"""Naming a clustering: ``CLUSTER`` -> a run dir with k-means output, embeddings, metadata.

A clustering is either a config of the ``clustering`` group (``conf/clustering/NAME.yaml``)
or the name of a run under ``run.root`` that has ``kmeans/`` output. Scripts name
clusterings, never paths (``sbatch jobs/metrics.slurm CLUSTER``).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from lib.errors import ConfigError
from lib.hierarchical_kmeans import STAGE_ROOT
from lib.metrics_levels import ClusteringInputs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def configured_clusterings(conf_dir: Path = CONF_DIR) -> list[str]:
    """Names of ``conf/clustering/*.yaml``."""
    return sorted(p.stem for p in (conf_dir / "clustering").glob("*.yaml"))


def runs_with_kmeans(root: str | Path) -> list[str]:
    """Run names under ``root`` with a ``kmeans/`` directory."""
    r = Path(root)
    if not r.is_dir():
        return []
    return sorted(p.name for p in r.iterdir() if (p / STAGE_ROOT).is_dir())


def unknown_clustering(name: str, root: str | Path, conf_dir: Path = CONF_DIR) -> ConfigError:
    configured = configured_clusterings(conf_dir)
    runs = runs_with_kmeans(root)
    return ConfigError(
        f"unknown clustering {name!r}. Configured clusterings ({conf_dir / 'clustering'}): "
        f"{', '.join(configured) or 'none'}. Runs with kmeans/ output under run.root={root}: "
        f"{', '.join(runs) or 'none'}. Add conf/clustering/{name}.yaml (run_dir: ...) or "
        "pass the name of a run above (and run.root=... if it lives elsewhere)"
    )


def merged_embeddings(run_dir: Path) -> Path:
    """The merge stage's embeddings of ``run_dir`` (safetensors preferred, else npy)."""
    for name in ("embeddings.safetensors", "embeddings.npy"):
        p = run_dir / "merge" / name
        if p.exists():
            return p
    raise ConfigError(
        f"{run_dir / 'merge'} has no embeddings.safetensors or embeddings.npy; set "
        "clustering.embeddings to the embeddings this clustering was computed on"
    )


def clustering_inputs(cfg: DictConfig) -> ClusteringInputs:
    """Resolve ``cfg.clustering`` to paths, checking they exist."""
    c = cfg.clustering
    if not c.run_dir:
        raise ConfigError(
            "no clustering given: pass CLUSTER (python -m jobs.metrics CLUSTER) or "
            "clustering=NAME / clustering.run_dir=PATH"
        )
    run_dir = Path(str(c.run_dir))
    if not (run_dir / STAGE_ROOT).is_dir():
        raise ConfigError(
            f"clustering {c.name or run_dir}: {run_dir / STAGE_ROOT} does not exist; run the "
            "kmeans stage for that run first or fix clustering.run_dir"
        )
    emb = Path(str(c.embeddings)) if c.embeddings else merged_embeddings(run_dir)
    if not emb.exists():
        raise ConfigError(f"clustering {c.name}: embeddings {emb} do not exist")
    if c.metadata:
        meta: Path | None = Path(str(c.metadata))
        if not meta.exists():
            raise ConfigError(f"clustering {c.name}: metadata {meta} does not exist")
    else:
        meta = run_dir / "merge" / "metadata.parquet"
        meta = meta if meta.exists() else None
    return ClusteringInputs(str(c.name or run_dir.name), run_dir, emb, meta, str(c.text_field))
