"""A stage's SLURM resources: ``cluster.slurm.resources.<group>`` over ``default``, and the
node layout of a distributed stage (the slurm and submitit launchers share both)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lib.config.fields import to_plain
from lib.core.errors import ConfigError
from lib.plan.spec import StageSpec


def merged_resources(cfg: DictConfig, group: str) -> dict[str, Any]:
    """The stage's resources over the defaults (non-null values win)."""
    res = to_plain(cfg.cluster.slurm.resources)
    base = dict(res.get("default", {}))
    stage = res.get(group, {}) if group in res else {}
    for key, value in stage.items():
        if key == "additional_parameters":
            base[key] = {**(base.get(key) or {}), **(value or {})}
        elif key == "setup":
            base[key] = list(base.get(key) or []) + list(value or [])
        elif value is not None:
            base[key] = value
    return base


def node_layout(spec: StageSpec, res: dict[str, Any]) -> tuple[int, int]:
    """(nodes, tasks per node) of a distributed stage: ``ntasks_per_node`` defaults to the
    world size, ``nodes`` to what that needs. Raises ``ConfigError`` when they do not
    multiply to the world size."""
    per_node = int(res.get("ntasks_per_node") or spec.world_size)
    nodes = int(res.get("nodes") or max(1, -(-spec.world_size // per_node)))
    if nodes * per_node != spec.world_size:
        raise ConfigError(
            f"{spec.name}: world size {spec.world_size} != nodes {nodes} x "
            f"ntasks_per_node {per_node}; fix cluster.slurm.resources.{spec.group}"
        )
    return nodes, per_node


def require_shared_run_dir(root: str, launcher: str) -> None:
    """SLURM jobs write their logs and read their scripts on a file system every node
    mounts: an object-store run dir is refused with the fix."""
    from lib.core.storage import is_url

    if is_url(root):
        raise ConfigError(
            f"cluster={launcher} needs run.root on a file system the compute nodes share "
            f"(sbatch writes the task logs there), not {root}; set run.root=/shared/path, or "
            "run with cluster=local"
        )
