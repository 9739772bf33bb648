"""One file's download: resumable from its ``.part``, hashed while written, published
atomically.

The ``.part`` beside the final name holds the bytes received so far. A download starts
where it ends (its prefix is re-hashed first, so the sha256 covers the whole file),
opens the remote file, seeks, and prefetches the rest in many concurrent SFTP reads
(latency is paid once, not per 32 KiB). When every byte is there the ``.part`` is
fsynced; once verified, ``publish`` renames it to the final name (and fsyncs the
directory): the final name is absent or whole. A write that fails (disk full) keeps the ``.part`` for the next run.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko

from lib.core.errors import StorageError
from lib.core.hashing import CHUNK_BYTES
from lib.core.storage import fsync_dir
from lib.remote.errors import RemoteError

PART_SUFFIX = ".part"
# One SFTP read request; OpenSSH's sftp-server answers reads of up to 255 KiB.
REQUEST_BYTES = 128 << 10
# Reads in flight per file (REQUEST_BYTES each): enough to fill a fast link, bounded so a
# slow disk cannot make the prefetch buffer the whole file in memory.
MAX_REQUESTS = 64


@dataclass(frozen=True)
class Download:
    sha256: str
    bytes: int
    resumed_from: int  # bytes already in the .part when this download started
    transferred: int  # bytes received now


def part_path(final: Path) -> Path:
    return final.with_name(final.name + PART_SUFFIX)


def _hash_prefix(part: Path, digest: hashlib._Hash) -> int:
    n = 0
    with open(part, "rb") as fh:
        while block := fh.read(CHUNK_BYTES):
            digest.update(block)
            n += len(block)
    return n


def disk_full(part: Path, done: int, size: int) -> StorageError:
    return StorageError(
        f"disk full writing {part} ({done} of {size} bytes there); nothing was published and "
        f"the .part is kept: free space (df -h {part.parent}) and rerun the same command to "
        "resume from it"
    )


def download(
    sftp: paramiko.SFTPClient,
    remote_path: str,
    final: Path,
    size: int,
    on_bytes: Callable[[int], None] | None = None,
    *,
    resume: bool = True,
    request_bytes: int = REQUEST_BYTES,
    max_requests: int = MAX_REQUESTS,
) -> Download:
    """Fetch ``remote_path`` (``size`` bytes) into ``final``'s ``.part``, fsynced (the
    caller verifies it, then ``publish``es it); resume from the ``.part`` when ``resume``
    (else start over). ``on_bytes(n)`` as bytes arrive.
    Raises ``RemoteError`` (unreadable, or it shrank meanwhile), ``StorageError`` (disk
    full: the ``.part`` is kept)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(final)
    digest = hashlib.sha256()
    start = 0
    if part.exists():
        if resume and part.stat().st_size <= size:
            start = _hash_prefix(part, digest)
        else:
            part.unlink()
    pos = start
    try:
        # Reads of one request each: paramiko's buffered read() joins bytes objects, which
        # costs O(n^2) copying for reads much larger than a request.
        with sftp.open(remote_path, "rb", bufsize=request_bytes) as remote, open(part, "ab") as out:
            remote.MAX_REQUEST_SIZE = request_bytes
            if pos < size:
                remote.seek(pos)
                remote.prefetch(size, max_concurrent_requests=max_requests)
            while pos < size:
                block = remote.read(min(request_bytes, size - pos))
                if not block:
                    raise RemoteError(
                        f"{remote_path} ended at byte {pos} of {size}: it shrank while being "
                        "downloaded; rerun once the producer has finished writing it"
                    )
                out.write(block)
                digest.update(block)
                pos += len(block)
                if on_bytes is not None:
                    on_bytes(len(block))
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise disk_full(part, pos, size) from None
        if isinstance(exc, FileNotFoundError | PermissionError) and exc.filename is None:
            raise RemoteError(f"cannot read {remote_path} on the host: {exc}") from None
        raise
    return Download(digest.hexdigest(), pos, start, pos - start)


def publish(final: Path) -> None:
    """Rename ``final``'s complete, fsynced ``.part`` to ``final`` (replacing an older
    version whole) and fsync the directory."""
    os.replace(part_path(final), final)
    fsync_dir(final.parent)
