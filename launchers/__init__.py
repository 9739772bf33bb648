"""How tasks get run. Each launcher turns the same plan into processes, sbatch jobs or
remote commands; the job code is identical everywhere (DESIGN.md contract 1)."""

from __future__ import annotations

from omegaconf import DictConfig

from launchers.base import Launcher
from lib.config import LauncherKind


def get_launcher(cfg: DictConfig) -> Launcher:
    """The launcher named by ``cluster.launcher``."""
    kind = LauncherKind(cfg.cluster.launcher)
    if kind == LauncherKind.local:
        from launchers.local import LocalLauncher

        return LocalLauncher(cfg)
    if kind == LauncherKind.slurm:
        from launchers.slurm import SlurmLauncher

        return SlurmLauncher(cfg)
    if kind == LauncherKind.submitit:
        from launchers.submitit_launcher import SubmititLauncher

        return SubmititLauncher(cfg)
    raise NotImplementedError(
        f"cluster.launcher={kind.value} is not available in this version; use cluster=local"
    )
