"""``sync.parallel_sources``: at most N sources sync at once, across the tasks of a run
(processes under the local launcher, jobs under SLURM), with one lock file per slot on
the run dir's (or ``sync.dest``'s) file system."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def slot(files: list[Path], where: str, poll_s: float = 0.5) -> Iterator[int | None]:
    """Hold one of ``files`` (an exclusive ``flock``) while the block runs; wait for one to
    be free. No files: no limit (yields None)."""
    if not files:
        yield None
        return
    files[0].parent.mkdir(parents=True, exist_ok=True)
    said = False
    while True:
        for i, path in enumerate(files):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            try:
                yield i
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        if not said:
            log.info(
                "%s: waiting for one of %d sync slot(s) (sync.parallel_sources)", where, len(files)
            )
            said = True
        time.sleep(poll_s)
