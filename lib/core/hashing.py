"""Content and configuration digests (sha256)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO

CHUNK_BYTES = 8 << 20


def config_digest(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (plain containers)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def sha256_stream(fh: BinaryIO, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of what is left to read in ``fh``, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    while block := fh.read(chunk_bytes):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of a local file."""
    with open(path, "rb") as fh:
        return sha256_stream(fh, chunk_bytes)
