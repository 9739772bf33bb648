"""Log lines of a task: ``HH:MM:SS LEVEL [stage task rank] message`` on stderr, with
secrets masked: the values of the task's secret-looking environment variables and the
password of any URL (``lib.config.redact``), tracebacks included."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from lib.config.redact import environ_secret_values, mask
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


class RedactingFormatter(logging.Formatter):
    """Masks known secrets and URL passwords in the whole formatted record."""

    def __init__(self, fmt: str, datefmt: str, secrets: list[str]) -> None:
        super().__init__(fmt, datefmt)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record), self.secrets)


def setup_logging(label: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        RedactingFormatter(
            f"%(asctime)s %(levelname)s [{label}] %(message)s", "%H:%M:%S", environ_secret_values()
        )
    )
    logging.basicConfig(
        level=os.environ.get("EMBEDFLEET_LOG_LEVEL", "INFO"), handlers=[handler], force=True
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
