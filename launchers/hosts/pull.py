"""``cluster.multihost.storage=sync``: bring a finished task's outputs and marker from its
host's own run dir into the local run dir over SFTP.

The task's completion marker on the host names its outputs with sizes and sha256
(``lib.core.markers``), and the checkpoint markers it published (a k-means level's
steps, each naming its own outputs: they come first, each checkpoint's data before it). Each output is fetched with the sync stage's transfer
(``lib.sync.transfer``: resumable from its ``.part``, hashed while written), checked
against the marker's size and sha256, and published under its final name; the marker
comes last, so the local run dir never holds a marker whose data is not there. A file
that is not as its marker says is removed from the host with the markers vouching for
it, so that the next push replaces it. An
output already local with the marker's size and sha256 is not fetched again. Pulled
files keep the host's modification time, so the next push (rsync, which compares size
and time) does not send them back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path

import paramiko

from lib.core.errors import InvalidMarkerError
from lib.core.markers import CompletionMarker, discard_marker, parse_marker
from lib.core.paths import RunPaths
from lib.remote.errors import RemoteError
from lib.sync.transfer import download, part_path, publish


class NotAsMarked(RemoteError):
    """A file on the host is not as its marker says (size or sha256): the host's copy is
    bad, not the connection."""

    def __init__(self, message: str, remote: str) -> None:
        super().__init__(message)
        self.remote = remote


@dataclass(frozen=True)
class Pulled:
    files: list[str]  # run-dir names published locally, in order (the marker last)
    skipped: list[str]  # outputs already local with the marker's size and sha256
    bytes: int


def _safe_name(name: str, where: str) -> str:
    """``name`` if it is a plain relative path inside the run dir, else ``RemoteError``."""
    norm = posixpath.normpath(name)
    if not name or name.startswith("/") or norm != name or norm.split("/")[0] == "..":
        raise RemoteError(f"{where}: output {name!r} is not a path inside the run dir; not pulled")
    return name


def _local_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _fetch(sftp: paramiko.SFTPClient, remote: str, local: Path, size: int, sha256: str | None):
    """Download ``remote`` (``size`` bytes) into ``local``: verified against ``sha256``
    when given (a mismatch drops the ``.part`` and raises ``RemoteError``), then published
    with the remote modification time."""
    try:
        st = sftp.stat(remote)
    except OSError as exc:
        raise RemoteError(f"cannot stat {remote} on the host: {exc}") from None
    if st.st_size != size:
        raise NotAsMarked(
            f"{remote} on the host has {st.st_size} bytes, its marker says {size}", remote
        )
    got = download(sftp, remote, local, size)
    if sha256 is not None and got.sha256 != sha256:
        part_path(local).unlink(missing_ok=True)
        raise NotAsMarked(
            f"{remote}: the downloaded bytes have sha256 {got.sha256}, its marker says "
            f"{sha256}; nothing was published (the file changed on the host, or the copy "
            "was corrupted): the task is retried",
            remote,
        )
    publish(local)
    if st.st_mtime is not None:
        # Both copies get the same whole-second time (SFTP v3 carries no fraction), so the
        # next push's quick check (size and time, exact) skips this file there; a stale
        # copy on another host (another attempt's, written at some fraction of a second)
        # does not match and is replaced.
        when = (st.st_atime or st.st_mtime, st.st_mtime)
        with contextlib.suppress(OSError):
            sftp.utime(remote, when)
        os.utime(local, when)


def _read_marker(sftp: paramiko.SFTPClient, where: str) -> tuple[bytes, CompletionMarker]:
    try:
        with sftp.open(where, "rb") as fh:
            blob = fh.read()
    except OSError as exc:
        raise RemoteError(f"no completion marker at {where} on the host ({exc})") from None
    try:
        return blob, parse_marker(blob, where)
    except InvalidMarkerError as exc:
        raise RemoteError(f"the marker {where} on the host cannot be read: {exc}") from None


def _pull_marked(
    sftp: paramiko.SFTPClient,
    root: str,
    paths: RunPaths,
    marker: str,
    blob: bytes,
    parsed: CompletionMarker,
    got: Pulled,
) -> int:
    """The outputs of ``parsed`` (read from ``marker`` on the host), then the marker;
    their names go into ``got``; returns the bytes fetched."""
    where = f"{root}/{marker}"
    total = 0
    for out in parsed.outputs:
        name = _safe_name(out.path, where)
        local = Path(paths.storage.local_file(name))
        if (
            local.is_file()
            and local.stat().st_size == out.bytes
            and _local_sha256(local) == out.sha256
        ):
            got.skipped.append(name)
            continue
        _fetch(sftp, f"{root}/{name}", local, out.bytes, out.sha256)
        got.files.append(name)
        total += out.bytes
    local_marker = Path(paths.storage.local_file(marker))
    _fetch(sftp, where, local_marker, len(blob), hashlib.sha256(blob).hexdigest())
    got.files.append(marker)
    return total + len(blob)


def pull_task(sftp: paramiko.SFTPClient, remote_root: str, paths: RunPaths, marker: str) -> Pulled:
    """Copy the outputs named by the marker ``marker`` (a run-dir name) of the host's run
    dir ``remote_root`` into ``paths``, data first, the marker last; before them, each
    checkpoint marker the task marker lists (a k-means level's steps) with the outputs it
    names, each checkpoint's data before its marker. Raises ``RemoteError`` when a marker
    is missing or unreadable there, an output is not as its marker says, or a transfer
    fails; what was published stays (it is verified), the task marker is then not
    local."""
    root = remote_root.rstrip("/")
    where = f"{root}/{marker}"
    blob, parsed = _read_marker(sftp, where)
    # A local marker of an earlier attempt must not describe outputs being replaced.
    discard_marker(paths.storage, marker)
    got = Pulled([], [], 0)
    total = 0
    checkpoint = where
    try:
        for name in parsed.checkpoints:
            name = _safe_name(name, where)
            checkpoint = f"{root}/{name}"
            ck_blob, ck_parsed = _read_marker(sftp, checkpoint)
            discard_marker(paths.storage, name)
            total += _pull_marked(sftp, root, paths, name, ck_blob, ck_parsed, got)
        checkpoint = where
        total += _pull_marked(sftp, root, paths, marker, blob, parsed, got)
    except NotAsMarked as exc:
        # The host's copy is bad. Left there, a later push (rsync's quick check: size and
        # whole-second time) could take it for the verified local copy of the same size
        # written in the same second and keep it: the bad file and the markers that vouch
        # for it are removed from the host, so the push sends the local ones.
        gone = _remove(sftp, [exc.remote, checkpoint, where])
        raise RemoteError(f"{exc} ({len(gone)} of its files removed from the host)") from None
    return Pulled(got.files, got.skipped, total)


def _remove(sftp: paramiko.SFTPClient, remotes: list[str]) -> list[str]:
    """Remove each of ``remotes`` from the host (best effort); the ones removed."""
    gone = []
    for remote in dict.fromkeys(remotes):
        with contextlib.suppress(OSError):
            sftp.remove(remote)
            gone.append(remote)
    return gone


def pull_file(sftp: paramiko.SFTPClient, remote: str, local: Path) -> bool:
    """Copy ``remote`` (a log) over ``local`` whole, unverified; False if it is not there."""
    try:
        st = sftp.stat(remote)
    except OSError:
        return False
    if st.st_mode is not None and not stat.S_ISREG(st.st_mode):
        return False
    download(sftp, remote, local, int(st.st_size or 0), resume=False)
    publish(local)
    return True
