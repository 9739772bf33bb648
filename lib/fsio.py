"""Atomic publication of files: write to a temporary name, fsync, rename.

Every output of a task goes through these helpers so that a file with its final name is
always complete (DESIGN.md contract 2). A crash leaves at most a ``*.tmp-*`` file behind,
which nothing reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def temporary_name(path: Path) -> Path:
    """A unique sibling of ``path`` that readers ignore (``name.tmp-<hex>``)."""
    return path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json_or_none(path: str | Path) -> Any | None:
    """The JSON document at ``path``, or None if it is missing or unreadable (half-written
    files cannot exist here, since every JSON is written atomically, but a user may edit)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def sha256_file(path: str | Path, chunk_bytes: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(directory: Path) -> int:
    """Delete ``*.tmp-*`` leftovers of crashed writers in ``directory``; return how many."""
    if not directory.is_dir():
        return 0
    removed = 0
    for entry in directory.iterdir():
        if TMP_MARK in entry.name and entry.is_file():
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def check_writable(directory: Path) -> None:
    """Raise a clear ``PermissionError`` if ``directory`` cannot be created or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(directory / ".write-probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(
            f"output directory {directory} is not writable ({exc.strerror or exc}); "
            "choose another with run.root=/a/writable/path"
        ) from exc
