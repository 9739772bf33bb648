"""How tasks get run: one launcher per place (``local``, ``slurm/``, ``submitit``,
``hosts/``: SSH hosts and TPU VM workers), all
consuming the same plan and starting the same job entry points (DESIGN.md contract 1).

``base`` is the interface; this module holds the table of launchers by the name
``cluster.launcher`` uses. Launchers import ``lib``; ``lib`` never imports them.
"""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from launchers.base import Launcher
from lib.core.errors import ConfigError

LAUNCHERS: dict[str, str] = {
    "local": "launchers.local:LocalLauncher",
    "slurm": "launchers.slurm.launcher:SlurmLauncher",
    "submitit": "launchers.submitit:SubmititLauncher",
    "hosts": "launchers.hosts.launcher:HostsLauncher",
    "tpu_vm": "launchers.hosts.launcher:TpuVmLauncher",
}


def get_launcher(cfg: DictConfig) -> Launcher:
    """The launcher named by ``cluster.launcher`` (``ConfigError`` listing the known ones)."""
    name = str(cfg.cluster.launcher)
    if name not in LAUNCHERS:
        raise ConfigError(
            f"cluster.launcher={name}: no such launcher; known: {', '.join(LAUNCHERS)}"
        )
    module, _, cls = LAUNCHERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(cfg)
