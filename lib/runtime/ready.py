"""A task saying it has finished loading (its model, its engine) and now does the work.

The multi-host launchers bound how many tasks are in their start phase at once
(``cluster.multihost.max_concurrent_starts``): 32 machines loading a model at the same
moment can overwhelm the server it comes from. They give each task a file to create,
``$EMBEDFLEET_READY_FILE``; the task's start phase lasts until it exists (or the task
ends). ``lib.runtime.job`` creates it before the stage's work for the stages that load
nothing worth bounding; the embed and extract stages create it once their model is
loaded. Elsewhere (local, SLURM) the variable is unset and this does nothing.
"""

from __future__ import annotations

import logging
import os

ENV_READY_FILE = "EMBEDFLEET_READY_FILE"

log = logging.getLogger(__name__)


def mark_ready() -> None:
    """Create ``$EMBEDFLEET_READY_FILE`` (once; a failure to is logged, never raised: the
    launcher then counts the task as starting until it ends)."""
    path = os.environ.get(ENV_READY_FILE)
    if not path or os.path.exists(path):
        return
    try:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write the ready file %s (%s)", path, exc)
