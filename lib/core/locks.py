"""Locks that keep two launchers, or two copies of one task, off the same run dir.

- The run lock (``RunPaths.launcher_lock``) is held by a launcher from before it writes
  ``run.yaml`` and ``plan.json`` until it returns (a SLURM or submitit launcher: while it
  submits). A second launcher of the same run dir is refused with the holder named.
- A task lock (``RunPaths.task_lock``) is held by the process running a task, so that a
  second copy (a relaunch beside an orphan, a task started by hand) stops before it
  touches the task's outputs.

On a local path both are ``fcntl.flock`` locks: the kernel releases them when the holder
dies, kill -9 included, so a lock is never stale; the file records the holder (host, pid,
process start, time, command) for the message. The record is written into the locked
file itself and not published through ``lib.core.storage``: a published file is a new
inode, and flock locks the inode. A record left in a free lock file means its holder
died without releasing it; the next holder says so. On an object store the run lock is
a create-only object with the same record, removed on release; one left by a dead
process of this host is taken over with a warning, one from another host is refused
with the object to delete.

A launcher that goes on in the background (the hosts launcher's detached scheduler)
takes the run lock over without a gap: the launch hands the flock's file descriptor to
the child it starts (``RunLock.hand_over``, ``pass_fds``), which records itself as the
holder (``take_over_run_lock``); an flock belongs to the open file, so it stays held
while the child lives and is released by the kernel when it dies. The object lock is
handed over by its token (``RunLock.object_token``): the child, on the launching host,
checks that the object still holds that token and rewrites it naming itself (pid,
process start, a token of its own), so the launch's release leaves it alone, the child's
removes it, and a child that dies leaves a record of a dead process of this host, which
the next launcher takes over as stale.

Process identity guards against pid reuse: ``process_start`` is the boot id and the
start time of the process (``/proc/PID/stat``), so a pid that now names another process,
or the same number after a reboot, is not taken for the holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lib.core.errors import RunLockedError
from lib.core.storage import Storage, json_bytes

log = logging.getLogger(__name__)

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name is in parentheses and may itself contain spaces and ')'.
    return text[text.rfind(")") + 2 :].split()


def process_start(pid: int) -> str | None:
    """``BOOT_ID:TICKS``: when process ``pid`` started (None without ``/proc``, or if it is
    gone). Two processes never share it, whatever their pids."""
    fields = _proc_stat(pid)
    if fields is None or len(fields) < 20:
        return None
    return f"{_boot_id()}:{fields[19]}"  # field 22 of stat: start time in clock ticks


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether ``pid`` runs on this host (not a zombie) and, when ``start`` is given, is
    still the process that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    fields = _proc_stat(pid)
    if fields is not None and fields[0] in ("Z", "X"):
        return False  # exited; only its exit status is left for a parent to collect
    if start is not None:
        now = process_start(pid)
        if now is not None and now != start:
            return False
    return True


@dataclass
class Holder:
    """Who holds a lock."""

    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    process_start: str | None = None
    started: float = field(default_factory=time.time)
    command: str = field(default_factory=lambda: shlex.join(sys.argv))
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if self.process_start is None and self.pid == os.getpid():
            self.process_start = process_start(self.pid)

    @classmethod
    def parse(cls, blob: bytes) -> Holder | None:
        try:
            data: dict[str, Any] = json.loads(blob)
            return cls(
                host=str(data["host"]),
                pid=int(data["pid"]),
                process_start=data.get("process_start"),
                started=float(data.get("started") or 0.0),
                command=str(data.get("command") or "?"),
                token=str(data.get("token") or ""),
            )
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}, started {when} ({self.command})"

    def alive(self) -> bool | None:
        """True/False on this host; None when it ran on another host (cannot be told)."""
        if self.host != socket.gethostname():
            return None
        return process_alive(self.pid, self.process_start)


class _FileLock:
    """An exclusive flock on ``path`` holding a ``Holder`` record (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.previous: Holder | None = None  # the record a dead holder left, if any
        self.handed_over = False  # another process holds it now: close, never unlock

    def acquire(self) -> Holder | None:
        """Take the lock; return None, or the live holder if another process has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.parse(_read_fd(fd)) or Holder(
                host="?", pid=0, command="its record is not written yet"
            )
            os.close(fd)
            return holder
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                log.warning(
                    "%s: this file system does not support locks (%s); nothing stops a "
                    "second launcher or task copy on this run dir",
                    self.path,
                    exc.strerror,
                )
                return None
            raise
        self.fd = fd
        self.previous = Holder.parse(_read_fd(fd))
        record = json_bytes(asdict(Holder()))
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        return None

    def release(self) -> None:
        if self.fd is None:
            return
        if self.handed_over:  # the child's copy of the open file keeps it locked
            os.close(self.fd)
            self.fd = None
            return
        # An empty file is a lock released properly; a record means its holder died.
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read_fd(fd: int) -> bytes:
    return os.pread(fd, 1 << 16, 0)


def _refusal(root: str, holder: Holder, lock_url: str, remote: bool) -> RunLockedError:
    how = (
        f"wait for it (`python launch.py wait {root}`) or stop it (`kill {holder.pid}` on "
        f"{holder.host}), then rerun the same command; to run another configuration beside "
        "it, choose another run.name"
    )
    if remote:
        how += f". If that launcher is gone (its machine was lost), delete {lock_url} and rerun"
    return RunLockedError(
        f"run dir {root} is in use by another launcher: {holder.describe()}. {how}"
    )


class RunLock:
    """The run dir's launcher lock; use as a context manager (``run_lock``)."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage = storage
        self.name = name
        self._file: _FileLock | None = None
        self._token: str | None = None

    def acquire(self) -> None:
        """Take the lock. Raises ``RunLockedError`` naming the holder if another launcher
        has it."""
        if self.storage.is_local:
            lock = _FileLock(self.storage.local_file(self.name))
            holder = lock.acquire()
            if holder is not None:
                raise _refusal(self.storage.root, holder, self.storage.url(self.name), False)
            if lock.previous is not None:
                log.warning(
                    "run dir %s: taking over the lock of a launcher that ended without "
                    "releasing it (%s)",
                    self.storage.root,
                    lock.previous.describe(),
                )
            self._file = lock
            return
        me = Holder()
        for _ in range(2):
            if self.storage.create(self.name, json_bytes(asdict(me))):
                self._token = me.token
                return
            try:
                holder = Holder.parse(self.storage.read_bytes(self.name))
            except FileNotFoundError:
                continue  # released in between: try again
            if holder is None or holder.alive() is not False:
                break
            log.warning(
                "run dir %s: taking over a stale lock (%s is no longer running)",
                self.storage.root,
                f"pid {holder.pid} on {holder.host}",
            )
            self.storage.remove(self.name)
        else:
            holder = None
        raise _refusal(
            self.storage.root,
            holder or Holder(host="?", pid=0, command="unreadable lock record"),
            self.storage.url(self.name),
            True,
        )

    def hand_over(self) -> int | None:
        """The file descriptor of the held flock, for a child process that goes on holding
        the lock (``take_over_run_lock``; give it with ``subprocess.Popen(pass_fds=...)``).
        From then on ``release`` only closes this process's copy. None where the lock is
        not an flock (an object store, a file system without locks)."""
        if self._file is None or self._file.fd is None:
            return None
        self._file.handed_over = True
        return self._file.fd

    def object_token(self) -> str | None:
        """The token of the held object lock (an object-store run dir), for a child
        process on this host that goes on holding it (``take_over_run_lock(token=...)``).
        The launch's ``release`` then removes the object only while it still holds this
        token, that is if the child never took it over. None where the lock is an flock."""
        return self._token

    def release(self) -> None:
        if self._file is not None:
            self._file.release()
            self._file = None
        if self._token is not None:
            with contextlib.suppress(FileNotFoundError):
                holder = Holder.parse(self.storage.read_bytes(self.name))
                if holder is not None and holder.token == self._token:
                    self.storage.remove(self.name)
            self._token = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


@contextlib.contextmanager
def run_lock(storage: Storage, name: str, *, enabled: bool = True) -> Iterator[RunLock | None]:
    """Hold the run dir's launcher lock ``name`` for the block (nothing when not
    ``enabled``: a dry run writes nothing); yields the lock (None when not enabled).
    Raises ``RunLockedError``."""
    if not enabled:
        yield None
        return
    with RunLock(storage, name) as lock:
        yield lock


def take_over_run_lock(
    storage: Storage, name: str, fd: int | None = None, *, token: str | None = None
) -> RunLock:
    """In a process started with the descriptor ``fd`` of a run lock that its parent
    handed over (``RunLock.hand_over``), or the ``token`` of its object lock
    (``RunLock.object_token``): record this process as the holder (the parent's command
    kept in the record) and return the lock, released on ``release`` (an flock also on
    exit; an object left by a dead holder is taken over as stale). Raises
    ``RunLockedError`` when the object holds another token (another launcher has it)."""
    if fd is None:
        if token is None:
            raise ValueError("take_over_run_lock needs the handed-over fd or token")
        return _take_over_object(storage, name, token)
    os.set_inheritable(fd, False)  # not to the ssh processes this one starts
    lock = _FileLock(storage.local_file(name))
    lock.fd = fd
    parent = Holder.parse(_read_fd(fd))
    me = Holder(command=f"the detached scheduler of: {parent.command}" if parent else "?")
    record = json_bytes(asdict(me))
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    os.fsync(fd)
    out = RunLock(storage, name)
    out._file = lock
    return out


def _take_over_object(storage: Storage, name: str, token: str) -> RunLock:
    """``take_over_run_lock`` of an object lock: rewrite the object holding ``token`` so
    that it names this process (and a new token); take it anew if it was released in
    between (the launch interrupted before the hand-over)."""
    try:
        parent = Holder.parse(storage.read_bytes(name))
    except FileNotFoundError:
        parent = None
    out = RunLock(storage, name)
    if parent is None:
        out.acquire()  # released in between: a free lock, taken (or refused) as usual
        return out
    if parent.token != token:
        raise _refusal(storage.root, parent, storage.url(name), True)
    me = Holder(command=f"the detached scheduler of: {parent.command}")
    storage.publish_bytes(name, json_bytes(asdict(me)))
    out._token = me.token
    return out


@contextlib.contextmanager
def task_lock(storage: Storage, name: str, label: str) -> Iterator[None]:
    """Hold the task lock ``name`` for the block on a local-path run dir (elsewhere a
    no-op: the attempt records tell live tasks apart there). Raises ``RunLockedError``
    naming the process that runs ``label`` already."""
    if not storage.is_local:
        yield
        return
    lock = _FileLock(storage.local_file(name))
    holder = lock.acquire()
    if holder is not None:
        raise RunLockedError(
            f"{label} is already running ({holder.describe()}); not starting a second copy "
            f"of it. Wait for that one to finish, or stop it (`kill {holder.pid}` on "
            f"{holder.host}) and rerun"
        )
    try:
        yield
    finally:
        lock.release()
