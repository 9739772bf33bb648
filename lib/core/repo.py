"""Where the checkout lives: task commands run ``python -m jobs.<stage>`` from here."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
