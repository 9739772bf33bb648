"""What the extract stage says in the end-of-run summary."""

from __future__ import annotations

from lib.core.paths import RunPaths
from lib.plan.spec import StageSpec


def summary(paths: RunPaths, specs: list[StageSpec]) -> list[str]:
    """Samples, tokens, shards and bytes over all tasks, and where the metadata is."""
    blob = paths.storage.read_json(paths.extract_metadata)
    if blob is None:
        return []
    return [
        f"  extract        {blob['samples']} samples, {blob['tokens']} tokens, layers "
        f"{blob['layers']} ({blob['dtype']}) in {blob['shards']} shard(s), "
        f"{blob['bytes'] / 1e6:.1f} MB: {paths.url(paths.extract_metadata)}",
        "  read with      from lib.extract import ActivationReader; "
        f"ActivationReader({paths.root!r}).iter_layer({blob['layers'][0]})",
    ]
