"""Log lines of a task: ``HH:MM:SS LEVEL [stage task rank] message`` on stderr."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from lib.core.errors import EmbedfleetError

NOISY = (
    "httpx",
    "urllib3",
    "filelock",
    "fsspec",
    "sentence_transformers",
    "botocore",
    "aiobotocore",
    "s3fs",
    "gcsfs",
)


def setup_logging(label: str) -> None:
    logging.basicConfig(
        level=os.environ.get("EMBEDFLEET_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s [{label}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def exit_code(fn: Callable[[], int], log: logging.Logger) -> int:
    """``fn()``'s exit code; a clear error (``EmbedfleetError``) is logged without a
    traceback and gives 1, Ctrl-C gives 130."""
    try:
        return fn()
    except EmbedfleetError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
