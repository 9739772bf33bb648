"""Secrets never reach a run dir: values of secret-looking keys are replaced before a
config is saved or shown."""

from __future__ import annotations

import re
from typing import Any

SECRET_KEY = re.compile(r"(pass(word|wd)?|secret|token|api_?key|credential|private_?key)$", re.I)
REDACTED = "***REDACTED***"


def redact(obj: Any) -> Any:
    """A copy of a plain config tree with values of secret-looking keys replaced.

    Keys that *name a file* holding a secret (``*_file``, ``*_path``) are kept: the path is
    not the secret.
    """
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and SECRET_KEY.search(k) and v not in (None, ""):
                out[k] = REDACTED
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj
