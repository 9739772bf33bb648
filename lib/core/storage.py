"""Where a run dir lives: a local path or an fsspec URL (``s3://``, ``gs://``, ...).

Every file of a run dir is written, listed and read through a ``Storage``; names are
relative POSIX paths made by ``lib.core.paths.RunPaths``. The invariant (DESIGN.md
contract 2): a name is either absent or holds its complete content.

- ``publish(name)`` hands out a local file to write. When the ``with`` block ends without
  an exception the file appears under ``name``, whole; on an exception nothing appears.
  On a POSIX path: a temporary sibling ``name.tmp-<hex>`` is fsynced, renamed over
  ``name`` and the directory fsynced. On an object store: the object is uploaded under
  its final name from a local staging file, and an upload is visible only once complete.
- ``create(name, data)`` is create-only, for completion markers, which are written last:
  ``os.link`` on a POSIX path, a conditional put (S3 ``If-None-Match: *``, GCS
  ``ifGenerationMatch=0``) on an object store. It returns False when ``name`` exists.
- ``local_path(name)``: a local file with the content, for memory maps and parquet
  readers: the file itself on a local run dir, a cached copy (checked against the
  object's size and etag) under the scratch dir on an object store.
- ``list(prefix)``: every name under ``prefix`` with its size, in one call.

Credentials and endpoints of object stores come from the environment or fsspec's own
configuration (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``FSSPEC_S3_*``,
``GOOGLE_APPLICATION_CREDENTIALS``; ``STORAGE_EMULATOR_HOST=http://host:port`` sends gs://
to a GCS emulator, as it does Google's own clients), never from the run config.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lib.core.errors import StorageError
from lib.core.hashing import sha256_file, sha256_stream

# gcsfs hangs against emulators unless this is set before it is first imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


class _OneLine(logging.Filter):
    """gcsfs logs a request that ran out of retries with its whole traceback (through
    Python's last-resort handler when nothing is configured); the storage error raised
    here names the URL, the cause and the fix, so the library's record keeps one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("gcsfs").addFilter(_OneLine())

TMP_MARK = ".tmp-"
_STAMP = ".ef-stamp"


@dataclass(frozen=True)
class OutputFile:
    """A published file as a completion marker records it."""

    path: str  # relative to the run dir
    bytes: int
    sha256: str


@dataclass
class Staged:
    """A file being published: write ``path``; set ``sha256`` if the writer computed it.

    After the ``with`` block, ``output`` describes what was published."""

    path: Path
    name: str
    sha256: str | None = None
    output: OutputFile | None = None


def is_url(location: str | Path) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


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


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


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
        _fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def json_bytes(obj: Any) -> bytes:
    """Indented, key-sorted JSON (how every manifest and marker is written)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` to the local ``path`` atomically (scratch sidecars, tests)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(json_bytes(obj))


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


def default_scratch() -> Path:
    """Where object-store runs stage uploads and cache downloads unless told otherwise."""
    return Path(tempfile.gettempdir())


def expand_scratch(configured: str | None) -> Path:
    """A scratch dir setting (``cluster.scratch_dir``, e.g. ``$LSCRATCH``) with environment
    variables expanded on this node; an unset variable falls back to ``$TMPDIR``/``/tmp``."""
    expanded = os.path.expandvars(configured or "$TMPDIR")
    if "$" in expanded or not expanded:
        expanded = os.environ.get("TMPDIR") or "/tmp"
    return Path(expanded)


class Storage(ABC):
    """A run dir (or another tree of published files) on a local disk or an object store."""

    is_local: bool

    def __init__(self, root: str, scratch: Path | None = None) -> None:
        self.root = root.rstrip("/")
        self.scratch = Path(scratch) if scratch else default_scratch()

    def url(self, name: str = "") -> str:
        """The location of ``name`` as a user would type it (for messages and commands)."""
        return f"{self.root}/{name}" if name else self.root

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

    # -- reading --------------------------------------------------------------------------
    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def size(self, name: str) -> int | None:
        """Size in bytes, or None if ``name`` does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> dict[str, int]:
        """Every published name under ``prefix`` (recursively) with its size, in one call."""

    @abstractmethod
    def open(self, name: str) -> BinaryIO:
        """A binary stream of ``name`` (``FileNotFoundError`` if it does not exist)."""

    @abstractmethod
    def local_path(self, name: str) -> Path:
        """A local file holding ``name``'s content (``FileNotFoundError`` if missing)."""

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as fh:
            return fh.read()

    def read_many(self, names: list[str]) -> dict[str, bytes]:
        """The content of each of ``names`` that exists (missing ones are left out)."""
        out = {}
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                out[name] = self.read_bytes(name)
        return out

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def read_json(self, name: str) -> Any | None:
        """The JSON document at ``name``, or None if it is missing or unreadable (every
        JSON is published whole, but a user may edit one)."""
        try:
            return json.loads(self.read_bytes(name))
        except (FileNotFoundError, ValueError):
            return None

    def sha256(self, name: str) -> str:
        with self.open(name) as fh:
            return sha256_stream(fh)

    # -- writing --------------------------------------------------------------------------
    @contextlib.contextmanager
    def publish(
        self, name: str, *, digest: bool = True, keep_local: bool = False
    ) -> Iterator[Staged]:
        """Write ``staged.path``; on success it becomes ``name``, complete, or nothing does.

        ``digest``: record the file's sha256 in ``staged.output`` (computed from the
        local file unless the writer set ``staged.sha256``). ``keep_local``: keep the
        written file as the local copy ``local_path(name)`` returns (an object store
        then needs no download for the next reader on this machine)."""
        staged = Staged(self._staging_file(name), name)
        try:
            yield staged
            size = staged.path.stat().st_size
            sha = staged.sha256 or (sha256_file(staged.path) if digest else "")
            self._commit(staged.path, name, keep_local)
            staged.output = OutputFile(name, size, sha)
        finally:
            if staged.path.exists():
                staged.path.unlink()

    def publish_bytes(self, name: str, data: bytes) -> OutputFile:
        with self.publish(name, digest=False) as staged:
            staged.path.write_bytes(data)
            staged.sha256 = hashlib.sha256(data).hexdigest()
        assert staged.output is not None
        return staged.output

    def publish_json(self, name: str, obj: Any) -> OutputFile:
        return self.publish_bytes(name, json_bytes(obj))

    @abstractmethod
    def create(self, name: str, data: bytes) -> bool:
        """Create ``name`` with ``data`` unless it exists (then return False, change nothing)."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Delete ``name`` if it exists."""

    @abstractmethod
    def remove_tree(self, prefix: str) -> None:
        """Delete everything under ``prefix``."""

    @abstractmethod
    def _staging_file(self, name: str) -> Path: ...

    @abstractmethod
    def _commit(self, tmp: Path, name: str, keep_local: bool) -> None: ...

    def remove_stale_temporaries(self, prefix: str) -> int:
        """Leftovers of writers that crashed mid-write under ``prefix`` (local only: an
        object store never shows an unfinished upload)."""
        return 0

    def clean_temporaries(self, prefix: str) -> int:
        """Delete the temporaries (``name.tmp-<hex>``, see ``publish``) of writers killed
        mid-write whose final name starts with ``prefix``, at any depth; return how many.

        A task calls it first, with a prefix only its own outputs have (``merge/``,
        ``embed/shards/shard_00003.``): sibling tasks may be publishing next to it. On an
        object store an unfinished upload is never visible, so nothing is there to clean."""
        return 0

    @abstractmethod
    def check_writable(self) -> None:
        """Raise with the location and the fix if the run dir cannot be written."""

    @abstractmethod
    def local_file(self, name: str) -> Path:
        """A stable local file for ``name`` that a writer may append to while it works (a
        task's log): the file itself on a local run dir, a staging file on an object store,
        where ``publish_log`` uploads it."""

    @abstractmethod
    def publish_log(self, name: str) -> None:
        """Make the file appended at ``local_file(name)`` visible under ``name``."""


class LocalStorage(Storage):
    """A run dir on a POSIX file system."""

    is_local = True

    def __init__(self, root: str | Path, scratch: Path | None = None) -> None:
        super().__init__(str(Path(root).expanduser().absolute()), scratch)
        self.base = Path(self.root)

    def path(self, name: str) -> Path:
        return self.base / name if name else self.base

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def size(self, name: str) -> int | None:
        try:
            return self.path(name).stat().st_size
        except FileNotFoundError:
            return None

    def list(self, prefix: str = "") -> dict[str, int]:
        top = self.path(prefix)
        out: dict[str, int] = {}
        if top.is_file():
            return {prefix: top.stat().st_size}
        for dirpath, _, files in os.walk(top):
            for f in files:
                if TMP_MARK in f:
                    continue
                p = Path(dirpath) / f
                with contextlib.suppress(FileNotFoundError):
                    out[p.relative_to(self.base).as_posix()] = p.stat().st_size
        return out

    def open(self, name: str) -> BinaryIO:
        p = self.path(name)
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist")
        return open(p, "rb", buffering=0)

    def local_path(self, name: str) -> Path:
        p = self.path(name)
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        return p

    def local_file(self, name: str) -> Path:
        return self.path(name)

    def publish_log(self, name: str) -> None:
        """Already in place: the log was appended to the run dir's own file."""

    def _staging_file(self, name: str) -> Path:
        final = self.path(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        return temporary_name(final)

    def _commit(self, tmp: Path, name: str, keep_local: bool) -> None:
        final = self.path(name)
        _fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)

    def create(self, name: str, data: bytes) -> bool:
        final = self.path(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(final)
        try:
            tmp.write_bytes(data)
            _fsync_file(tmp)
            try:
                os.link(tmp, final)  # fails if final exists: create-only
            except FileExistsError:
                return False
            fsync_dir(final.parent)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def remove_tree(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def remove_stale_temporaries(self, prefix: str) -> int:
        return remove_stale_temporaries(self.path(prefix))

    def clean_temporaries(self, prefix: str) -> int:
        top = self.path(prefix) if prefix.endswith("/") or not prefix else self.path(prefix).parent
        removed = 0
        for dirpath, _, files in os.walk(top):
            for f in files:
                if TMP_MARK not in f:
                    continue
                p = Path(dirpath) / f
                if p.relative_to(self.base).as_posix().startswith(prefix):
                    p.unlink(missing_ok=True)
                    removed += 1
        return removed

    def check_writable(self) -> None:
        check_writable(self.base)


class FsspecStorage(Storage):
    """A run dir on an object store (or any fsspec file system), e.g. ``s3://bucket/runs/x``."""

    is_local = False

    def __init__(self, root: str, scratch: Path | None = None) -> None:
        super().__init__(root, scratch)
        import fsspec

        try:
            # Listings are never cached: tasks in other processes publish while we look.
            self.fs, self.base = fsspec.core.url_to_fs(self.root, use_listings_cache=False)
        except (ImportError, ValueError) as exc:
            raise StorageError(
                f"{self.root}: no file system for this URL ({exc}); install the fsspec "
                "backend (s3fs for s3://, gcsfs for gs://: pip install 'embedfleet[remote]')"
            ) from exc
        self.base = self.base.rstrip("/")
        tag = hashlib.sha1(self.root.encode()).hexdigest()[:16]
        self._cache = self.scratch / "embedfleet-cache" / tag
        self._stage = self.scratch / "embedfleet-staging" / tag

    def _p(self, name: str) -> str:
        return f"{self.base}/{name}" if name else self.base

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self._p(name)))

    def size(self, name: str) -> int | None:
        try:
            info = self.fs.info(self._p(name))
        except FileNotFoundError:
            return None
        return None if info.get("type") == "directory" else int(info["size"])

    def list(self, prefix: str = "") -> dict[str, int]:
        found = self.fs.find(self._p(prefix), detail=True)
        out = {}
        for path, info in found.items():
            rel = path[len(self.base) + 1 :] if path.startswith(self.base + "/") else path
            if info.get("type", "file") != "directory" and TMP_MARK not in rel:
                out[rel] = int(info.get("size") or 0)
        return out

    def open(self, name: str) -> BinaryIO:
        return self.fs.open(self._p(name), "rb")

    def read_bytes(self, name: str) -> bytes:
        return bytes(self.fs.cat_file(self._p(name)))

    def read_many(self, names: list[str]) -> dict[str, bytes]:
        if not names:
            return {}
        paths = {self._p(n): n for n in names}
        got = self.fs.cat(list(paths), on_error="omit")  # a list in: a dict out, concurrently
        return {paths[p]: bytes(v) for p, v in got.items() if not isinstance(v, Exception)}

    @staticmethod
    def _stamp(info: dict) -> str:
        tag = next(
            (
                str(info[k])
                for k in ("ETag", "etag", "md5Hash", "generation", "mtime")
                if info.get(k)
            ),
            "",
        )
        return f"{int(info['size'])}:{tag}"

    def local_path(self, name: str) -> Path:
        info = self.fs.info(self._p(name))  # FileNotFoundError when missing
        target = self._cache / name
        stamp = target.with_name(target.name + _STAMP)
        want = self._stamp(info)
        if target.exists() and stamp.exists() and stamp.read_text() == want:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(target)
        try:
            self.fs.get_file(self._p(name), str(tmp))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        stamp.write_text(want)
        return target

    def local_file(self, name: str) -> Path:
        p = self._stage / "files" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def publish_log(self, name: str) -> None:
        src = self.local_file(name)
        if src.exists():
            self.fs.put_file(str(src), self._p(name))

    def _staging_file(self, name: str) -> Path:
        self._stage.mkdir(parents=True, exist_ok=True)
        return temporary_name(self._stage / Path(name).name)

    def _commit(self, tmp: Path, name: str, keep_local: bool) -> None:
        self.fs.put_file(str(tmp), self._p(name))
        if keep_local:
            target = self._cache / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)  # staging and cache share the scratch file system
            stamp = self._stamp(self.fs.info(self._p(name)))
            target.with_name(target.name + _STAMP).write_text(stamp)

    def create(self, name: str, data: bytes) -> bool:
        path = self._p(name)
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except TypeError:  # a file system without conditional writes: best effort
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
        return True

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._p(name))

    def remove_tree(self, prefix: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.fs.exists(self._p(prefix)):
                self.fs.rm(self._p(prefix), recursive=True)

    def check_writable(self) -> None:
        probe = f".write-probe{TMP_MARK}{uuid.uuid4().hex[:12]}"
        try:
            self.fs.pipe_file(self._p(probe), b"")
            self.fs.rm_file(self._p(probe))
        except Exception as exc:  # every backend raises its own types; all mean the same
            raise StorageError(
                f"run dir {self.root} is not writable ({type(exc).__name__}: {exc}); check "
                "the bucket name and the credentials in the environment (AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL for S3, "
                "GOOGLE_APPLICATION_CREDENTIALS for GCS, STORAGE_EMULATOR_HOST for a GCS "
                "emulator), or choose another run.root"
            ) from exc


def open_storage(root: str | Path, scratch: Path | None = None) -> Storage:
    """The storage of ``root``: a local path (or ``file://``) or an fsspec URL."""
    text = str(root)
    if is_url(text):
        return FsspecStorage(text, scratch)
    return LocalStorage(text.removeprefix("file://"), scratch)


def join(root: str, *parts: str) -> str:
    """``root`` joined with ``parts`` for a local path or a URL alike."""
    out = str(root).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out
