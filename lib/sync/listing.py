"""Which remote files a source's patterns match, over SFTP.

A pattern is a glob relative to ``remote_dir``, one ``fnmatch`` per path segment
(``shards/shard_*.safetensors``, ``*/completions/task_*.json``); ``**`` matches any number
of directories. Only regular files match. The relative path of a match is kept, so files
land at ``sync/<source>/<relative path>``.
"""

from __future__ import annotations

import fnmatch
import posixpath
import stat
from dataclasses import dataclass

import paramiko

from lib.remote.errors import RemoteError

SHOWN_ENTRIES = 20


class RemoteListingError(RemoteError):
    """remote_dir is missing, unreadable, or nothing in it matches."""


@dataclass(frozen=True)
class RemoteFile:
    rel: str  # relative to remote_dir, POSIX
    path: str  # absolute on the host
    size: int
    mtime: int


def _entries(sftp: paramiko.SFTPClient, path: str) -> list[paramiko.SFTPAttributes]:
    try:
        return sftp.listdir_attr(path)
    except OSError:
        return []


def _walk(sftp, top: str, rel: str, segments: list[str], out: dict[str, RemoteFile]) -> None:
    head, rest = segments[0], segments[1:]
    if head == "**":
        if rest:
            _walk(sftp, top, rel, rest, out)  # zero directories
        for entry in _entries(sftp, posixpath.join(top, rel) if rel else top):
            if entry.st_mode is not None and stat.S_ISDIR(entry.st_mode):
                child = posixpath.join(rel, entry.filename) if rel else entry.filename
                _walk(sftp, top, child, segments, out)
        return
    for entry in _entries(sftp, posixpath.join(top, rel) if rel else top):
        if not fnmatch.fnmatchcase(entry.filename, head) or entry.st_mode is None:
            continue
        child = posixpath.join(rel, entry.filename) if rel else entry.filename
        if rest and stat.S_ISDIR(entry.st_mode):
            _walk(sftp, top, child, rest, out)
        elif not rest and stat.S_ISREG(entry.st_mode):
            out[child] = RemoteFile(
                child,
                posixpath.join(top, child),
                int(entry.st_size or 0),
                int(entry.st_mtime or 0),
            )


def list_matches(
    sftp: paramiko.SFTPClient, remote_dir: str, patterns: list[str], where: str
) -> list[RemoteFile]:
    """The regular files under ``remote_dir`` matching any of ``patterns``, sorted by
    relative path. Raises ``RemoteListingError``: ``remote_dir`` missing or not a directory
    (naming its parent's entries), or no match (listing the first entries there)."""
    try:
        attrs = sftp.stat(remote_dir)
    except OSError as exc:
        parent = posixpath.dirname(remote_dir.rstrip("/")) or "/"
        raise RemoteListingError(
            f"{where}: remote_dir {remote_dir} does not exist or cannot be read ({exc}); "
            f"{parent} holds: {_shown(sftp, parent)}. Fix remote_dir in sync.sources"
        ) from None
    if attrs.st_mode is None or not stat.S_ISDIR(attrs.st_mode):
        raise RemoteListingError(f"{where}: remote_dir {remote_dir} is not a directory")
    found: dict[str, RemoteFile] = {}
    for pattern in patterns:
        _walk(sftp, remote_dir, "", [s for s in pattern.split("/") if s], found)
    if not found:
        raise RemoteListingError(
            f"{where}: no file under {remote_dir} matches {patterns}; it holds: "
            f"{_shown(sftp, remote_dir)}. Fix patterns (globs relative to remote_dir, e.g. "
            "'cluster*_gpu*.pkl' or 'shards/shard_*.safetensors')"
        )
    return [found[k] for k in sorted(found)]


def _shown(sftp: paramiko.SFTPClient, path: str) -> str:
    entries = sorted(_entries(sftp, path), key=lambda e: e.filename)
    if not entries:
        return "(nothing, or it cannot be listed)"
    names = [
        e.filename + ("/" if e.st_mode is not None and stat.S_ISDIR(e.st_mode) else "")
        for e in entries[:SHOWN_ENTRIES]
    ]
    more = f" ... and {len(entries) - SHOWN_ENTRIES} more" if len(entries) > SHOWN_ENTRIES else ""
    return ", ".join(names) + more
