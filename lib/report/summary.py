"""What the report stage says in the end-of-run summary."""

from __future__ import annotations

from lib.core.paths import REPORT_DIR, RunPaths
from lib.plan.spec import StageSpec


def summary(paths: RunPaths, specs: list[StageSpec]) -> list[str]:
    """Where the page is (open it in a browser: it loads nothing from the network)."""
    if paths.storage.read_json(paths.marker(REPORT_DIR, 0)) is None:
        return []
    return [f"  report         {paths.url(paths.report_page)}  (open it in a browser)"]
