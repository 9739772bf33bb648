"""Experiment tracking of metrics: ``tracking=none`` (default) or ``tracking=wandb``.

W&B runs online when an API key is available (``WANDB_API_KEY`` or the file named by
``tracking.api_key_file``) and offline otherwise (``wandb sync <dir>/wandb/offline-run-*``
uploads later). The key is handed to wandb through this process's environment only; it is
never written into configs, run dirs or logs.

Everything wandb writes stays under ``<dir>/wandb`` (``WANDB_DIR``, and the cache, data,
config and artifact dirs it would otherwise put in ``~/.cache``, ``~/.local/share``,
``~/.config`` and ``./artifacts``), unless the user set those variables; it is quiet
(``WANDB_SILENT``, ``silent``/``console="off"`` settings: our own log lines say where the
run is), and each W&B run finishes the previous one (``reinit="finish_previous"``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lib.core.errors import ConfigError

log = logging.getLogger(__name__)


class NullTracker:
    def log_level(self, level: int, scalars: dict, per_cluster: dict, examples: list) -> None:
        pass

    def finish(self) -> None:
        pass


def wandb_environment(root: Path) -> dict[str, str]:
    """The variables that keep wandb's files under ``root`` (its ``dir``) and quiet."""
    base = root / "wandb"
    return {
        "WANDB_DIR": str(root),
        "WANDB_CACHE_DIR": str(base / ".cache"),
        "WANDB_DATA_DIR": str(base / ".data"),
        "WANDB_CONFIG_DIR": str(base / ".config"),
        "WANDB_ARTIFACT_DIR": str(base / ".artifacts"),
        "WANDB_SILENT": "true",
    }


def _set_environ(values: Mapping[str, str]) -> dict[str, str | None]:
    """Set the variables the user did not set; return what to restore."""
    before = {k: os.environ.get(k) for k in values if k not in os.environ}
    for k in before:
        os.environ[k] = values[k]
    return before


class WandbTracker:
    """One W&B run; ``log_level`` logs a level's scalars, per-cluster table and examples."""

    def __init__(self, tcfg: Any, out_dir: Path, name: str, config: dict) -> None:
        try:
            import wandb
        except ImportError as exc:  # pragma: no cover - wandb is in the tracking extra
            raise ConfigError(
                "tracking=wandb needs the wandb package: pip install 'embedfleet[tracking]'"
            ) from exc
        self.wandb = wandb
        key = os.environ.get("WANDB_API_KEY")
        if not key and tcfg.api_key_file:
            p = Path(os.path.expanduser(str(tcfg.api_key_file)))
            if not p.is_file():
                raise ConfigError(f"tracking.api_key_file={p} does not exist or is not a file")
            key = p.read_text().strip()
            if not key:
                raise ConfigError(f"tracking.api_key_file={p} is empty")
            os.environ["WANDB_API_KEY"] = key  # this process only; never written
        mode = str(tcfg.mode)
        if mode == "auto":
            mode = "online" if key else "offline"
        run_dir = Path(str(tcfg.dir)) if tcfg.dir else out_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        log.info("W&B run in %s mode under %s", mode, run_dir / "wandb")
        # wandb-core, the service wandb starts, inherits these; restored by finish.
        self._restore = _set_environ(wandb_environment(run_dir))
        self.run = wandb.init(
            project=str(tcfg.project),
            entity=str(tcfg.entity) if tcfg.entity else None,
            name=str(tcfg.run_name) if tcfg.run_name else f"{name}-metrics",
            dir=str(run_dir),
            mode=mode,
            config=config,
            tags=[str(t) for t in tcfg.tags],
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.mode = mode

    def log_level(self, level: int, scalars: dict, per_cluster: dict, examples: list) -> None:
        prefix = f"level{level}"
        numbers = {
            f"{prefix}/{k}": float(v)
            for k, v in scalars.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        cols = list(per_cluster)
        rows = np.column_stack([np.asarray(per_cluster[c], dtype=np.float64) for c in cols])
        table = self.wandb.Table(columns=cols, data=rows.tolist())
        ex_cols = ["kind", "rank", "cluster", "size", "score", "row", "distance", "text"]
        ex_rows = []
        for e in examples:
            score = e["silhouette"] if "silhouette" in e["kind"] else e["mean_sq_distance"]
            for r in e["rows"]:
                ex_rows.append(
                    [e["kind"], e["rank"], e["cluster"], e["size"], score, r["row"],
                     r["distance"], r["text"]]
                )  # fmt: skip
        self.run.log(
            {
                **numbers,
                f"{prefix}/per_cluster": table,
                f"{prefix}/examples": self.wandb.Table(columns=ex_cols, data=ex_rows),
            }
        )
        self.run.summary.update(numbers)

    def finish(self) -> None:
        try:
            self.run.finish()
        finally:
            for k, v in self._restore.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def make_tracker(tcfg: Any, out_dir: Path, name: str, config: dict) -> NullTracker | WandbTracker:
    if str(tcfg.backend) == "wandb":
        return WandbTracker(tcfg, out_dir, name, config)
    return NullTracker()
