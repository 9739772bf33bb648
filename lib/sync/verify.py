"""Is a downloaded file the remote one? Size first, then sha256 from the best source.

Methods, best first (each file's marker entry says which one it got):

- ``remote-sha256``: ``sha256sum`` run on the host over an exec channel (it runs while
  the file downloads, so it costs no wall time on a fast host).
- ``manifest``: the account allows SFTP only (``ForceCommand internal-sftp``) or has no
  ``sha256sum``: the sha256 a producer recorded beside the files. embedfleet's own
  completion markers (``completions/task_*.json``, outputs with sha256) are such
  manifests, matched by path suffix; so are ``SHA256SUMS`` / ``*.sha256`` files in
  ``sha256sum`` format.
- ``size-only``: neither is available; said in the marker and the end-of-run summary.
"""

from __future__ import annotations

import json
import posixpath
import re
import threading

import paramiko

from lib.remote.errors import RemoteError
from lib.remote.ssh import Connection
from lib.sync.listing import RemoteFile, _walk

REMOTE, MANIFEST, SIZE_ONLY = "remote-sha256", "manifest", "size-only"
_HEX = re.compile(r"^\\?([0-9a-f]{64}) [ *]")
MANIFEST_PATTERNS = ("**/completions/task_*.json", "**/SHA256SUMS", "**/*.sha256")
MAX_MANIFEST_BYTES = 16 << 20


class ExecUnavailable(Exception):
    """The account cannot run commands (SFTP only) or has no ``sha256sum``."""


def remote_sha256(conn: Connection, path: str, timeout: float = 3600.0) -> str:
    """``sha256sum`` of ``path`` computed on the host. Raises ``ExecUnavailable`` when the
    account cannot run it, ``RemoteError`` when it fails on the file."""
    try:
        result = conn.exec(["sha256sum", "--", path], timeout=timeout)
    except RemoteError as exc:
        raise ExecUnavailable(str(exc)) from None
    m = _HEX.match(result.stdout.decode(errors="replace"))
    if result.status == 0 and m:
        return m.group(1)
    said = (result.stdout + result.stderr).decode(errors="replace").strip()
    if result.status == 127 or "sftp" in said.lower() or not said or "not found" in said:
        raise ExecUnavailable(said or f"exit status {result.status}")
    raise RemoteError(f"{conn.host.where()}: sha256sum {path} failed: {said[:300]}")


def _read_small(sftp: paramiko.SFTPClient, path: str, size: int) -> bytes | None:
    if size > MAX_MANIFEST_BYTES:
        return None
    try:
        with sftp.open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def manifest_sha256(
    sftp: paramiko.SFTPClient, remote_dir: str, files: list[RemoteFile]
) -> dict[str, str]:
    """{rel: sha256} of the ``files`` that a manifest under ``remote_dir`` describes
    (embedfleet markers by output-path suffix; ``SHA256SUMS``/``*.sha256`` by name)."""
    found: dict[str, RemoteFile] = {}
    for pattern in MANIFEST_PATTERNS:
        _walk(sftp, remote_dir, "", pattern.split("/"), found)
    by_path = {f.path: f.rel for f in files}
    out: dict[str, str] = {}
    for manifest in found.values():
        blob = _read_small(sftp, manifest.path, manifest.size)
        if blob is None:
            continue
        if manifest.rel.endswith(".json"):
            try:
                outputs = json.loads(blob).get("outputs") or []
            except (ValueError, AttributeError):
                continue
            for o in outputs:
                if not isinstance(o, dict) or not o.get("sha256") or not o.get("path"):
                    continue
                suffix = "/" + str(o["path"]).lstrip("/")
                for path, rel in by_path.items():
                    if path.endswith(suffix):
                        out.setdefault(rel, str(o["sha256"]))
            continue
        base = posixpath.dirname(manifest.path)
        for line in blob.decode(errors="replace").splitlines():
            m = re.match(r"^([0-9a-fA-F]{64}) [ *](.+)$", line.strip())
            if m:
                rel = by_path.get(posixpath.normpath(posixpath.join(base, m.group(2))))
                if rel is not None:
                    out.setdefault(rel, m.group(1).lower())
    return out


class Verifier:
    """The sha256 a downloaded file must have, for one source: from the host while exec
    works, else from the manifests (read once), else none (size only)."""

    def __init__(self, remote_dir: str, files: list[RemoteFile]) -> None:
        self.remote_dir, self.files = remote_dir, files
        self.exec_ok: bool | None = None  # None: not tried yet
        self.exec_why = ""
        self._manifest: dict[str, str] | None = None
        self._lock = threading.Lock()

    def expected(self, conn: Connection, f: RemoteFile) -> tuple[str, str | None]:
        """(method, sha256 or None) for ``f``, asking ``conn``'s host."""
        if self.exec_ok is not False:
            try:
                sha = remote_sha256(conn, f.path)
                self.exec_ok = True
                return REMOTE, sha
            except ExecUnavailable as exc:
                with self._lock:
                    self.exec_ok, self.exec_why = False, str(exc)
        sha = self.manifest(conn).get(f.rel)
        return (MANIFEST, sha) if sha else (SIZE_ONLY, None)

    def manifest(self, conn: Connection) -> dict[str, str]:
        with self._lock:
            if self._manifest is None:
                sftp = conn.sftp()
                try:
                    self._manifest = manifest_sha256(sftp, self.remote_dir, self.files)
                finally:
                    sftp.close()
            return self._manifest
