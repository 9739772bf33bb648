"""What the sync stage says at the end of a run: per source, files, bytes, MB/s, how they
were verified, files resumed, files that vanished remotely."""

from __future__ import annotations

from lib.core.paths import RunPaths
from lib.plan.spec import StageSpec


def source_lines(blob: dict) -> list[str]:
    """The summary lines of one sync marker (as JSON)."""
    counts, extra = blob.get("counts", {}), blob.get("extra", {})
    wall = float(blob.get("wall_seconds") or 0.0)
    moved = int(counts.get("transferred_bytes", 0))
    rate = moved / 1e6 / wall if wall > 0 else 0.0
    methods = extra.get("verification") or ["-"]
    lines = [
        f"  sync {extra.get('source', '?'):<9} {counts.get('files', 0)} file(s), "
        f"{counts.get('bytes', 0) / 1e6:.1f} MB from {extra.get('host', '?')}:"
        f"{extra.get('remote_dir', '?')}; {counts.get('downloaded', 0)} downloaded "
        f"({moved / 1e6:.1f} MB in {wall:.1f} s, {rate:.1f} MB/s), {counts.get('skipped', 0)} "
        f"already verified; verified by {', '.join(methods)}: {extra.get('dest', '')}"
    ]
    if "size-only" in methods:
        lines.append(
            "      size-only: the host ran no sha256sum for this account and no manifest "
            "describes these files; their content is unverified"
        )
    if extra.get("resumed"):
        lines.append(f"      resumed from a .part: {', '.join(sorted(extra['resumed']))}")
    if extra.get("vanished"):
        shown = extra["vanished"][:10]
        more = f" (+{len(extra['vanished']) - 10} more)" if len(extra["vanished"]) > 10 else ""
        lines.append(
            f"      no longer on the host (kept here, not deleted): {', '.join(shown)}{more}"
        )
    return lines


def summary(paths: RunPaths, specs: list[StageSpec]) -> list[str]:
    lines: list[str] = []
    for spec in specs:
        for t in range(spec.num_tasks):
            blob = paths.storage.read_json(paths.marker(spec.stage_dir, t))
            if blob:
                lines += source_lines(blob)
    return lines
