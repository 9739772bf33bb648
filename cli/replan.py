"""``--force-replan``: accept a changed configuration or input in an existing run dir.

Every marker (task or checkpoint) of a stage whose config hash is not this plan's is
invalidated (moved aside with the reason, ``lib.core.markers.invalidate_marker``), so the
launch redoes those tasks instead of refusing the run dir; stages whose hash is unchanged
keep their outputs.
"""

from __future__ import annotations

from lib.core.errors import InvalidMarkerError
from lib.core.markers import invalidate_marker, parse_marker
from lib.core.paths import RunPaths
from lib.plan.spec import Plan


def discard_changed_stages(paths: RunPaths, plan: Plan) -> list[str]:
    """Invalidate the markers of ``plan``'s stages written under another config hash;
    return one line per stage that will be redone."""
    storage = paths.storage
    lines = []
    for spec in plan.stages:
        names = [n for n in storage.list(spec.stage_dir) if RunPaths.is_marker(n)]
        stale = []
        for name, blob in storage.read_many(names).items():
            try:
                found = parse_marker(blob, storage.url(name)).config_hash
            except InvalidMarkerError:  # an unreadable marker is redone as well
                found = "unreadable"
            if found != spec.config_hash:
                stale.append((name, found))
        for name, found in stale:
            invalidate_marker(
                storage,
                name,
                f"--force-replan: written under config hash {found[:12]}, the plan's is "
                f"{spec.config_hash[:12]}",
            )
        if stale:
            lines.append(
                f"--force-replan: {spec.name}: {len(stale)} marker(s) of another configuration "
                "invalidated; those tasks are redone"
            )
    return lines
