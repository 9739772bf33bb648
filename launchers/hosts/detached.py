"""The detached scheduler of a ``cluster=hosts|tpu_vm`` run (the default; ``--attach`` keeps
the scheduling loop in the foreground instead).

``launch.py`` (or ``retry``) starts ``python -m launchers.hosts.detached RUN_DIR`` in a
session of its own (``setsid``, stdin closed, stdout and stderr appended to
``RUN_DIR/scheduler.log``) and hands it the run lock it holds (the flock's descriptor,
or the object lock's token on an object-store run dir: ``lib.core.locks``), so a second
launch is refused naming the scheduler's pid while it lives. The scheduler reads ``run.yaml`` and ``plan.json`` as ``retry`` does and runs the
hosts launcher's stage loop: free-slot scheduling, retries on other hosts, the next
stages. It tells the launch through a pipe when the first tasks run (or that it failed
before: the error, or every stage already complete); the launch echoes the scheduler's
log until then and returns. ``status`` reads ``RUN_DIR/scheduler.json`` ("running (pid
N)" or "gone: relaunch to resume"), ``wait`` waits while it lives, ``cancel`` stops it
(SIGTERM: it stops its tasks and records them stopped) before it kills what is left on
the hosts. A ``kill -9`` of it leaves its tasks running; a relaunch adopts them.

On an object-store run dir (``run.root=s3://...``, ``cluster=hosts``) ``scheduler.json``
is in the bucket with the rest of the run dir (``status``, ``wait`` and ``cancel`` read
it there), and the scheduler runs on the launching machine, whose scratch dir holds its
log while it runs (``Storage.local_file``: where ``tail -f`` finds it; the launch and
``status`` name it); it is uploaded into the run dir as ``scheduler.log`` when the
scheduler ends. The bucket's credentials reach it only through the environment it
inherits from the launch (never a file, an object or its command line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
import traceback
from typing import Any

from launchers.base import LaunchResult
from lib.core.errors import ConfigError, EmbedfleetError
from lib.core.locks import RunLock, take_over_run_lock
from lib.core.paths import RunPaths
from lib.core.repo import REPO_ROOT
from lib.core.sharding import compress_indices

MODULE = "launchers.hosts.detached"


class SchedulerError(EmbedfleetError):
    """The detached scheduler stopped before any task ran; the message is its error."""


def scheduler_argv(run_dir: str) -> list[str]:
    """The command that runs the detached scheduler of ``run_dir`` (for ``--dry-run``)."""
    return [sys.executable, "-m", MODULE, run_dir]


def scheduler_log_location(paths: RunPaths) -> str:
    """Where the scheduler's log is, for the user: ``RUN_DIR/scheduler.log``; on an object
    store, the local file on this host, uploaded into the run dir when it ends."""
    if paths.storage.is_local:
        return paths.url(paths.scheduler_log)
    return (
        f"{paths.storage.local_file(paths.scheduler_log)} on {socket.gethostname()} "
        f"(uploaded to {paths.url(paths.scheduler_log)} when the scheduler ends)"
    )


def start_detached(paths: RunPaths, lock: RunLock | None, say=print) -> LaunchResult:
    """Start the scheduler of ``paths`` in the background, holding ``lock`` from now on;
    echo its log until its first tasks run; return ``submitted`` then, or what it ended
    with before (complete, failed tasks). Raises ``SchedulerError`` with its error."""
    log_path = paths.storage.local_file(paths.scheduler_log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    read_fd, write_fd = os.pipe()
    lock_fd = lock.hand_over() if lock is not None else None
    lock_token = lock.object_token() if lock is not None else None
    argv = [*scheduler_argv(paths.root), "--notify-fd", str(write_fd)]
    fds = [write_fd]
    if lock_fd is not None:
        argv += ["--lock-fd", str(lock_fd)]
        fds.append(lock_fd)
    elif lock_token is not None:
        argv += ["--lock-token", lock_token]
    try:
        with open(log_path, "ab") as log:
            log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} scheduler starting\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=fds,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
    finally:
        os.close(write_fd)
    log_url = scheduler_log_location(paths)
    with open(log_path, "rb") as fh:
        fh.seek(offset)
        fh.readline()  # the "scheduler starting" line
        try:
            event = _wait_for_event(read_fd, fh, say)
        except KeyboardInterrupt:
            say(
                f"\nthe scheduler (pid {proc.pid}) goes on in the background; stop it with "
                f"`python launch.py cancel {paths.root}`"
            )
            return LaunchResult(False, True, {})
        finally:
            os.close(read_fd)
    kind = event.get("event")
    if kind == "started":
        say(
            f"detached: the scheduler (pid {proc.pid}) starts the other tasks as slots free "
            f"up, retries failures on other hosts and runs the next stages; its log: {log_url}"
        )
        say(
            f"  python launch.py wait {paths.root}   (or status | logs RUN STAGE TASK | "
            "cancel); --attach keeps a launch in the foreground"
        )
        return LaunchResult(False, True, {})
    if kind == "done":
        failed = {str(k): [int(t) for t in v] for k, v in (event.get("failed") or {}).items()}
        interrupted = event.get("interrupted")
        return LaunchResult(bool(event.get("complete")), False, failed, interrupted=interrupted)
    if kind == "error":
        raise SchedulerError(str(event.get("message")))
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    raise SchedulerError(
        f"the detached scheduler (pid {proc.pid}) ended (exit code {proc.returncode}) before "
        f"starting a task; see its log {log_url}"
    )


def _wait_for_event(read_fd: int, log, say) -> dict[str, Any]:
    """Echo new lines of ``log`` until the scheduler writes its event line to ``read_fd``
    (returned) or closes it without one (``{}``: it died)."""
    buf = b""
    partial = b""

    def echo() -> None:
        nonlocal partial
        partial += log.read()
        *lines, partial = partial.split(b"\n")
        for line in lines:
            say(line.decode(errors="replace"))

    while True:
        ready, _, _ = select.select([read_fd], [], [], 0.2)
        if ready:
            chunk = os.read(read_fd, 1 << 16)
            echo()
            if not chunk:
                return {}
            buf += chunk
            if b"\n" in buf:
                with contextlib.suppress(ValueError):
                    return json.loads(buf.split(b"\n", 1)[0])
                return {}
        else:
            echo()


class _Notify:
    """The pipe to the launch that started this scheduler: one event line, then closed."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        if fd is not None:
            os.set_inheritable(fd, False)

    def send(self, event: dict[str, Any]) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):  # the launch is gone (Ctrl-C): nobody to tell
            os.write(fd, json.dumps(event).encode() + b"\n")
        with contextlib.suppress(OSError):
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    from lib.config.redact import environ_secret_values, mask

    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--notify-fd", type=int, default=None)
    ap.add_argument("--lock-fd", type=int, default=None)
    ap.add_argument("--lock-token", default=None)
    args = ap.parse_args(argv)
    paths = RunPaths(args.run_dir)
    notify = _Notify(args.notify_fd)
    try:
        lock = (
            take_over_run_lock(
                paths.storage, paths.launcher_lock, args.lock_fd, token=args.lock_token
            )
            if args.lock_fd is not None or args.lock_token is not None
            else None
        )
    except EmbedfleetError as exc:
        message = mask(str(exc), environ_secret_values())
        notify.send({"event": "error", "message": message})
        print(f"error: {message}", flush=True)
        return 1
    try:
        return _schedule(paths, notify, lock)
    finally:
        if lock is not None:
            lock.release()
        _upload_log(paths)


def _upload_log(paths: RunPaths) -> None:
    """An object-store run dir: this scheduler's log (appended to on this host) copied
    into the run dir as it ends; a failure is said in the log, not raised."""
    if paths.storage.is_local:
        return
    try:
        paths.storage.publish_log(paths.scheduler_log)
    except Exception as exc:  # the run's outcome is in scheduler.json and the markers
        print(
            f"WARNING: the scheduler's log was not uploaded to "
            f"{paths.url(paths.scheduler_log)}: {type(exc).__name__}: {str(exc)[:300]}",
            flush=True,
        )


def _schedule(paths: RunPaths, notify: _Notify, lock: RunLock | None) -> int:
    """The stage loop of ``paths`` (holding ``lock``), telling ``notify`` when the first
    tasks run or how it ended; returns the scheduler's exit code."""
    from launchers import get_launcher
    from launchers.hosts.launcher import HostsLauncher
    from lib.config.compose import load_run_config
    from lib.config.redact import environ_secret_values, mask
    from lib.plan.spec import Plan

    def started(spec, units) -> None:
        hosts = sorted({w.label for u in units for w in u.workers()})
        tasks = sorted({u.task for u in units})
        print(
            f"{spec.name}: task(s) {compress_indices(tasks)} started on {', '.join(hosts)}",
            flush=True,
        )
        notify.send({"event": "started", "stage": spec.name, "tasks": tasks})

    try:
        cfg = load_run_config(paths)
        plan = Plan.load(paths)
        launcher = get_launcher(cfg)
        if not isinstance(launcher, HostsLauncher):
            raise ConfigError(
                f"{MODULE} runs cluster=hosts|tpu_vm runs; {paths.root} is cluster.launcher="
                f"{cfg.cluster.launcher}"
            )
        launcher.detached = True
        launcher.on_started = started
        result = launcher.launch(paths, plan)
    except EmbedfleetError as exc:
        message = mask(str(exc), environ_secret_values())
        notify.send({"event": "error", "message": message})
        print(f"error: {message}", flush=True)
        return 1
    except Exception as exc:
        notify.send(
            {
                "event": "error",
                "message": f"the detached scheduler failed ({type(exc).__name__}: {exc}); "
                f"its log: {scheduler_log_location(paths)}",
            }
        )
        traceback.print_exc()
        return 1
    notify.send(
        {
            "event": "done",
            "complete": result.complete,
            "failed": result.failed,
            "interrupted": result.interrupted,
        }
    )
    if result.interrupted is not None:
        print("scheduler: stopped (its tasks were stopped); rerun to resume", flush=True)
        return 130
    if result.failed:
        stage, tasks = next(iter(result.failed.items()))
        print(
            f"scheduler: {stage} task(s) {compress_indices(tasks)} failed; rerun the same "
            f"command (or `python launch.py retry {paths.root}`) to redo only those",
            flush=True,
        )
        return 1
    print("scheduler: all stages complete", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
