"""Run-dir and task locks: a second holder is refused with the first named, a dead
holder's lock is taken over with a warning, on a local path (flock, in real processes)
and on an object store (a create-only object); pid reuse is told from the holder."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from lib.core.errors import RunLockedError
from lib.core.locks import (
    RunLock,
    process_alive,
    process_start,
    run_lock,
    task_lock,
)
from lib.core.paths import RunPaths
from lib.core.repo import REPO_ROOT
from lib.core.storage import open_storage

HOLD = """
import sys, time
from lib.core.storage import open_storage
from lib.core.locks import RunLock, task_lock
kind, root, name = sys.argv[1:4]
storage = open_storage(root)
if kind == "run":
    RunLock(storage, name).acquire()
else:
    held = task_lock(storage, name, "embed task 3")  # kept: collecting it would release
    held.__enter__()
print("held", flush=True)
time.sleep(600)
"""


def _holder(kind: str, root, name: str) -> subprocess.Popen:
    """Another process that takes the lock and keeps it until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, kind, str(root), name],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_second_launcher_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, caplog):
    storage = RunPaths(tmp_path).storage
    holder = _holder("run", tmp_path, RunPaths.launcher_lock)
    try:
        with pytest.raises(RunLockedError) as info:
            RunLock(storage, RunPaths.launcher_lock).acquire()
        text = str(info.value)
        assert f"run dir {tmp_path} is in use by another launcher: pid {holder.pid} on " in text
        assert socket.gethostname() in text and "launch.py wait" in text
        assert "choose another run.name" in text
    finally:
        _kill(holder)
    # kill -9 released the flock; the record it left is reported and replaced
    with caplog.at_level(logging.WARNING), run_lock(storage, RunPaths.launcher_lock):
        record = json.loads((tmp_path / RunPaths.launcher_lock).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert f"ended without releasing it (pid {holder.pid} on" in caplog.text
    # a lock released properly leaves nothing to warn about
    caplog.clear()
    with caplog.at_level(logging.WARNING), run_lock(storage, RunPaths.launcher_lock):
        pass
    assert "taking over" not in caplog.text


TAKE_OVER = """
import sys, time
from lib.core.storage import open_storage
from lib.core.locks import take_over_run_lock
held = take_over_run_lock(open_storage(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
print("held", flush=True)
time.sleep(600)
"""


def test_a_handed_over_run_lock_is_held_by_the_child_without_a_gap(tmp_path):
    """The launch hands the flock to a child (a detached scheduler) and returns: the lock
    stays held, now naming the child; when the child dies it is free again."""
    storage = RunPaths(tmp_path).storage
    with run_lock(storage, RunPaths.launcher_lock) as lock:
        assert lock is not None
        fd = lock.hand_over()
        assert fd is not None
        child = subprocess.Popen(
            [sys.executable, "-c", TAKE_OVER, str(tmp_path), RunPaths.launcher_lock, str(fd)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=(fd,),
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
    try:
        with pytest.raises(RunLockedError) as info:
            RunLock(storage, RunPaths.launcher_lock).acquire()
        assert f"pid {child.pid} on " in str(info.value)
        assert "the detached scheduler of: " in str(info.value)
    finally:
        _kill(child)
    with run_lock(storage, RunPaths.launcher_lock):
        pass


def test_a_dry_run_takes_no_lock(tmp_path):
    holder = _holder("run", tmp_path, RunPaths.launcher_lock)
    try:
        with run_lock(RunPaths(tmp_path).storage, RunPaths.launcher_lock, enabled=False):
            pass
    finally:
        _kill(holder)


def test_a_second_copy_of_a_task_is_refused(tmp_path):
    storage = RunPaths(tmp_path).storage
    name = RunPaths.task_lock("embed", 3)
    holder = _holder("task", tmp_path, name)
    try:
        with (
            pytest.raises(RunLockedError, match=r"embed task 3 is already running \(pid "),
            task_lock(storage, name, "embed task 3"),
        ):
            pass
    finally:
        _kill(holder)
    with task_lock(storage, name, "embed task 3"):
        pass


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _record(**fields) -> bytes:
    base = {"host": socket.gethostname(), "pid": 1, "started": time.time(), "command": "x"}
    return json.dumps({**base, **fields}).encode()


def test_object_store_lock_is_create_only_and_takes_over_a_dead_local_holder(caplog):
    root = f"memory://locks-{os.getpid()}-{time.time_ns()}/run"
    storage = open_storage(root)
    name = RunPaths.launcher_lock
    # a holder on another host cannot be checked: refused, with the object to delete
    storage.create(name, _record(host="elsewhere", pid=4242))
    with pytest.raises(RunLockedError) as info:
        RunLock(storage, name).acquire()
    assert "pid 4242 on elsewhere" in str(info.value)
    assert f"delete {storage.url(name)} and rerun" in str(info.value)
    # a holder of this host that died: taken over with a warning, removed on release
    storage.remove(name)
    storage.create(name, _record(pid=_dead_pid()))
    with caplog.at_level(logging.WARNING), run_lock(storage, name):
        assert json.loads(storage.read_bytes(name))["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on"):
            RunLock(storage, name).acquire()  # a live holder of this host: refused
    assert "taking over a stale lock" in caplog.text
    assert not storage.exists(name)


TAKE_OVER_OBJECT = """
import sys, time
from lib.core.storage import open_storage
from lib.core.locks import take_over_run_lock
held = take_over_run_lock(open_storage(sys.argv[1]), sys.argv[2], token=sys.argv[3])
print("held", flush=True)
if sys.argv[4] == "release":
    held.release()
    print("released", flush=True)
time.sleep(600)
"""


def _take_over_object(root: str, name: str, token: str, then: str) -> subprocess.Popen:
    """A child that takes over the object lock by ``token``, then holds or releases it."""
    return subprocess.Popen(
        [sys.executable, "-c", TAKE_OVER_OBJECT, root, name, token, then],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_handed_over_object_lock_names_the_child_and_is_stale_when_it_dies(s3_root, caplog):
    """An object-store run dir (moto's S3 server): the launch hands its lock object's token
    to a child (a detached scheduler), which rewrites the object naming itself; the launch's
    release leaves it; a second launcher is refused naming the child; when the child is
    killed (-9) its record is a dead process of this host, taken over as stale; a child
    that releases removes the object; a token that is not the object's is refused."""
    storage = open_storage(s3_root)
    name = RunPaths.launcher_lock
    with run_lock(storage, name) as lock:
        assert lock is not None and lock.hand_over() is None
        token = lock.object_token()
        assert token and json.loads(storage.read_bytes(name))["token"] == token
        child = _take_over_object(s3_root, name, token, "hold")
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
    try:
        record = json.loads(storage.read_bytes(name))  # the launch's release left it
        assert record["pid"] == child.pid and record["token"] != token
        assert record["process_start"] == process_start(child.pid)
        with pytest.raises(RunLockedError) as info:
            RunLock(storage, name).acquire()
        assert f"pid {child.pid} on {socket.gethostname()}" in str(info.value)
        assert "the detached scheduler of: " in str(info.value)
        # a token that is not the object's (another launcher's lock): refused, unchanged
        other = _take_over_object(s3_root, name, "not-the-token", "hold")
        _, err = other.communicate(timeout=60)
        assert other.returncode != 0 and f"pid {child.pid} on " in err, err
        assert json.loads(storage.read_bytes(name))["pid"] == child.pid
    finally:
        _kill(child)
    with caplog.at_level(logging.WARNING), run_lock(storage, name):
        assert json.loads(storage.read_bytes(name))["pid"] == os.getpid()
    assert f"taking over a stale lock (pid {child.pid} on" in caplog.text
    assert not storage.exists(name)
    # a child that ends properly removes the object; the launch's release then does nothing
    with run_lock(storage, name) as lock:
        assert lock is not None
        child = _take_over_object(s3_root, name, str(lock.object_token()), "release")
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        assert child.stdout.readline().strip() == "released"
        _kill(child)
        assert not storage.exists(name)
    assert not storage.exists(name)


def test_process_identity_tells_a_reused_pid_and_a_zombie_from_the_holder():
    me = os.getpid()
    assert process_alive(me) and process_alive(me, process_start(me))
    assert not process_alive(me, "another-boot:12345")  # the same number, another process
    assert not process_alive(_dead_pid())
    zombie = subprocess.Popen(["true"])
    deadline = time.time() + 10
    while time.time() < deadline and process_alive(zombie.pid):
        time.sleep(0.02)
    assert not process_alive(zombie.pid), "an exited, unreaped child counts as alive"
    zombie.wait()
