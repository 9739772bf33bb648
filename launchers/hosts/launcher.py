"""Run a plan's tasks on SSH hosts (``cluster=hosts``) or TPU VM workers (``cluster=tpu_vm``).

The same job commands, task identity, markers and ``status/logs/retry/wait/cancel`` as the
local and SLURM launchers; only the way a command reaches a machine differs (``ssh`` or
``gcloud compute tpus tpu-vm ssh --worker=i``, ``launchers.hosts.commands``).

- Each task process runs on its host detached, in its own session (``setsid nohup sh -c``):
  it writes its pid (its process group) and, as it ends, its exit code to files in the
  run dir (``RunPaths.remote_proc``, one pair per attempt); killing this launcher leaves
  it running, and ``status``/``cancel`` find it again from the attempt record.
- Array stages: tasks go to free slots as slots free up (a fast host takes more). A task
  whose host fails (ssh 255 or a timeout while starting or probing, its process gone
  without an exit code) or that exits non-zero runs again on another host, at most
  ``cluster.multihost.max_task_retries`` times; a host that fails
  ``host_failures_to_drop`` times (host failures, not the task's own exit codes) leaves
  the pool with a warning. ``fail_fast`` stops every task at the first failure.
- Distributed stages: one rank per slot across hosts; the rendezvous is the first
  placement's host address at a port chosen once per run (recorded in the attempt
  record), given as MASTER_ADDR/MASTER_PORT with RANK/WORLD_SIZE (``lib.runtime``).
- The run dir (``cluster.multihost.storage``): ``shared``, a path every host sees at the
  same place (a shared home, NFS): tasks write outputs, markers, logs and their pid/exit
  files there. ``sync`` (a local run.root): each host has its own run dir,
  ``<its workdir>/runs/<run name>``, where its tasks write all of that; before each
  stage the local run dir's files (previous stages' outputs and markers, run.yaml,
  plan.json) are rsync'ed there over the same ssh (only what is missing or changed), and
  when a task exits 0 its outputs, then its marker, are pulled back over SFTP
  (``launchers.hosts.pull``: sha256-verified against the marker, resumable), with its
  log. A pull that fails counts as the task failing on that host. A distributed task's
  ranks share one host there (they read each other's files). ``status`` reads the local
  run dir (and probes the hosts' pid/exit files); ``logs`` reads a running task's log
  from its host, and ``--attach`` streams it from there in each probe round. On
  ``tpu_vm`` the rsync and SFTP go over the ssh that gcloud would run for the worker
  (``TpuVmLauncher._derive_ssh``: its address, key, gcloud's known_hosts and host-key
  alias), not through gcloud itself.
- An object-store run dir (``run.root=s3://...`` or ``gs://...``, ``cluster=hosts`` or
  ``tpu_vm`` with ``storage=shared``): the tasks get the URL as their run dir and write
  outputs and markers there through ``lib.core.storage`` (credentials reach them through
  ``cluster.pass_env``); their pid/exit/ready files and logs are in each host's ``<its
  workdir>/runs/<run name>`` (as under ``sync``), each log copied here over SFTP when its
  task ends (on ``tpu_vm`` over the ssh gcloud would run, as above; not with
  ``tunnel_through_iap``) and uploaded into the run dir (``Storage.publish_log``, as the
  local launcher does); ``logs`` reads a running task's log from its host, as under
  ``sync``. Detached too: the scheduler runs on the launching machine and takes over the
  run's lock object (``lib.core.locks``).
- Detached (the default from the command line, ``Launcher.start``): the stage loop runs
  in a background scheduler process of its own (``launchers.hosts.detached``) and the
  launch returns once the first tasks run; ``--attach`` (``cluster.multihost.attach``)
  keeps it in the foreground, streaming every task's log. Whoever runs the loop records
  itself in ``RunPaths.scheduler`` (host, pid, start, how it ended) for ``status``,
  ``wait`` and ``cancel``.
- Code (``cluster.multihost.code_sync``): ``none`` (a shared tree), ``archive`` (``git
  archive HEAD`` unpacked as ``workdir/COMMIT``), ``rsync`` (the working tree's tracked
  files, committed or not, rsync'ed into ``workdir`` over the same ssh; on ``tpu_vm``
  over the ssh gcloud would run for each worker).
- Secrets (``cluster.pass_env``, and the ``cluster.env`` secrets a reloaded run.yaml
  redacted): read from this process's environment and written on the stdin of each start
  command, which exports them before it starts the tasks; never on a command line, in a
  file or a log. A name not set is an error at launch.
- ``--dry-run`` prints every command it would run, in full (secrets by name only).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import paramiko

from launchers.base import (
    FAILED,
    PENDING,
    RUNNING,
    Launcher,
    LaunchResult,
    LiveLog,
    SchedulerView,
    read_attempt,
    stop_signals_to,
    write_attempt,
)
from launchers.hosts.commands import (
    RemoteTask,
    SshTarget,
    TpuTarget,
    env_stdin,
    gcloud_describe_argv,
    gcloud_ssh_argv,
    gcloud_ssh_dry_run_argv,
    kill_command,
    log_read_command,
    parse_gcloud_ssh,
    parse_log_reads,
    probe_command,
    rsync_argv,
    run_dir_rsync_argv,
    ssh_argv,
    ssh_master_argv,
    start_command,
    unpack_command,
)
from launchers.hosts.pull import pull_file, pull_task
from launchers.hosts.starts import StartClock
from lib.config.redact import refuse_secret_literals, task_env
from lib.core.errors import ConfigError, EmbedfleetError
from lib.core.locks import RunLock, process_alive, process_start
from lib.core.markers import check_marker
from lib.core.paths import RunPaths
from lib.core.repo import REPO_ROOT
from lib.core.sharding import compress_indices
from lib.core.storage import is_url
from lib.plan.spec import DISTRIBUTED, Plan, StageSpec, completed_tasks
from lib.remote.credentials import Login
from lib.remote.errors import HostKeyError, RemoteError
from lib.remote.ssh import Host, connect
from lib.runtime.environment import PORT_BASE, PORT_SPAN
from lib.runtime.identity import TaskIdentity, identity_env
from lib.runtime.ready import ENV_READY_FILE

SSH_FAILED = 255  # ssh's own failure (cannot connect, host key refused), not the command's


def _git(mode: str, *args: str) -> bytes:
    """``git ARGS`` in this checkout (for ``code_sync=MODE``); a ConfigError naming the
    option when this is no git checkout or git fails."""
    try:
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ConfigError(
            f"cluster.multihost.code_sync={mode} needs this checkout to be a git "
            f"repository ({REPO_ROOT}): git {' '.join(args)} failed: {exc}"
        ) from None


@dataclass
class Worker:
    """A machine tasks run on: one SSH host, or one worker of a TPU VM."""

    index: int
    label: str
    address: str  # for the rendezvous of distributed stages
    slots: int
    env: dict[str, str]
    # (remote command, stdin wanted) -> the local argv that runs it
    argv: Callable[..., list[str]]
    master: list[str] | None = None  # opens a multiplexed connection (ssh only)
    # (local dir, remote dir) -> the rsync argv that copies files there (a TPU worker's
    # once its ssh was asked of gcloud: TpuVmLauncher._derive_ssh)
    rsync: Callable[[str, str], list[str]] | None = None
    failures: int = 0
    dropped: bool = False
    workdir: str = ""  # where its tasks run (code_sync=archive: workdir/COMMIT)
    home: str = ""  # its configured workdir (storage=sync: the run dir is home/runs/NAME)
    # storage=sync: (local run dir, remote run dir) -> the rsync argv of a push, and where
    # SFTP pulls connect (a TPU worker's, as rsync above)
    push: Callable[[str, str], list[str]] | None = None
    sftp_host: Host | None = None
    login: Login | None = None


@dataclass
class _Unit:
    """One attempt of a task: its processes (one per rank) and where they run."""

    task: int
    attempt: int
    tries: int  # attempts of this task in this launch, this one included
    placements: list[tuple[Worker, int]]  # (worker, rank)
    avoid: set[int] = field(default_factory=set)  # workers that failed this task
    started: float = field(default_factory=time.time)
    start_future: Future | None = None
    log_offsets: dict[int, int] = field(default_factory=dict)
    # Every process has said it finished loading (lib.runtime.ready) or has ended: its
    # start phase is over (cluster.multihost.max_concurrent_starts).
    ready: bool = False

    def workers(self) -> list[Worker]:
        seen: dict[int, Worker] = {}
        for w, _ in self.placements:
            seen.setdefault(w.index, w)
        return list(seen.values())


class _Interrupted(Exception):
    pass


def _key(task: int, rank: int) -> str:
    return f"t{task}r{rank}"


# storage=sync with --attach: what one probe round reads of the logs of a host's tasks
# (each log at most LOG_READ_BYTES, all of them about LOG_READ_HOST_BYTES, each at least
# LOG_READ_MIN_BYTES); what a round leaves comes in the next ones, and the rest of a log
# from its pulled copy once its task ends.
LOG_READ_BYTES = 64 * 1024
LOG_READ_HOST_BYTES = 256 * 1024
LOG_READ_MIN_BYTES = 4 * 1024


def _log_key(task: int, attempt: int, rank: int) -> str:
    return f"t{task}a{attempt}r{rank}"


def _dirs(ws: list[Worker]) -> str | dict[str, str]:
    """The workers' code dirs: one path when they share it, else per host label."""
    dirs = {w.label: w.workdir for w in ws}
    return next(iter(dirs.values())) if len(set(dirs.values())) == 1 else dirs


class HostsLauncher(Launcher):
    name = "hosts"

    def __init__(self, cfg, *, echo: bool = True) -> None:
        super().__init__(cfg)
        c = cfg.cluster
        self.mh = c.multihost
        refuse_secret_literals(c, self.name)
        self.code_sync = str(self.mh.code_sync)
        self.storage = str(self.mh.storage)
        entries = list(c.hosts or []) if self.name == "hosts" else []
        # every host names its own workdir (cluster.hosts[i].workdir)
        own_dirs = bool(entries) and all(h.get("workdir") for h in entries)
        if self.code_sync == "archive" and not (self.mh.workdir or own_dirs):
            raise ConfigError(
                "cluster.multihost.code_sync=archive unpacks `git archive HEAD` under "
                "cluster.multihost.workdir on every host: set it (e.g. ~/embedfleet-code)"
            )
        if self.code_sync == "rsync" and not (self.mh.workdir or own_dirs):
            raise ConfigError(
                "cluster.multihost.code_sync=rsync copies this checkout's tracked files into "
                "cluster.multihost.workdir on every host: set it (e.g. /home/me/embedfleet-code)"
            )
        self.workdir = str(self.mh.workdir or REPO_ROOT)
        if not self.workdir.startswith("/"):
            raise ConfigError(
                f"cluster.multihost.workdir={self.workdir} must be an absolute path (it is "
                "quoted on the remote command line, so ~ and $HOME are not expanded there)"
            )
        if self.storage == "sync" and not (self.mh.workdir or own_dirs):
            raise ConfigError(
                "cluster.multihost.storage=sync keeps each host's run dir under its workdir "
                "(WORKDIR/runs/RUN_NAME): set cluster.multihost.workdir (or "
                "cluster.hosts[i].workdir on every host), an absolute path"
            )
        # run.root=s3://...|gs://...: the tasks write the run dir through lib.core.storage;
        # their pid/exit/ready files and logs are in each host's WORKDIR/runs/RUN_NAME.
        self.object_root = is_url(str(cfg.run.root))
        self._own_workdir = bool(self.mh.workdir or own_dirs)
        self.code: dict = {"sync": self.code_sync}
        self.python = str(c.python or sys.executable)
        self.echo = echo
        # Sends of task starts, at least start_stagger_s apart (across stages and retries).
        self._clock = StartClock(float(self.mh.start_stagger_s))
        self._workers: list[Worker] | None = None
        self._signals = 0
        self._lock = threading.Lock()
        # Set by launchers.hosts.detached: this process is the run's background scheduler,
        # told (once) when the first tasks of the launch run.
        self.detached = False
        self.on_started: Callable[[StageSpec, list[_Unit]], None] | None = None
        # worker label -> (answered, [what runs there], [what failed there]), by scheduler_view
        self._host_states: dict[str, tuple[bool, list[str], list[str]]] = {}
        # storage=sync with --attach, in the stage loop: the logs of running tasks are read
        # from their hosts in each probe round. (stage, _log_key) -> bytes of the host's log
        # echoed so far; the last round's reads (its size, the bytes from there); logs
        # pulled whole as their task ended (the rest is echoed from the local copy).
        self._streaming = False
        self._log_sent: dict[tuple[str, str], int] = {}
        self._log_reads: dict[tuple[str, str], tuple[int, bytes]] = {}
        self._log_pulled: set[tuple[str, str]] = set()

    # -- machines -----------------------------------------------------------------------

    def make_workers(self) -> list[Worker]:
        hosts = list(self.cfg.cluster.hosts or [])
        if not hosts:
            raise ConfigError(
                "cluster=hosts needs cluster.hosts: a list of {address, port, user, key_file, "
                "slots, env}, e.g. cluster.hosts='[{address: 10.0.0.2, slots: 2}]'"
            )
        out = []
        # One master connection per host (OpenSSH ControlMaster) for this launcher: starts
        # and probes then open a channel instead of a new handshake each.
        mux = tempfile.mkdtemp(prefix="efssh-")
        for i, h in enumerate(hosts):
            if str(h.address) in ("", "???"):
                raise ConfigError(f"cluster.hosts[{i}] has no address")
            target = SshTarget(
                address=str(h.address),
                port=int(h.port),
                user=h.user or self.mh.user,
                key_file=os.path.expanduser(str(h.key_file or self.mh.key_file))
                if (h.key_file or self.mh.key_file)
                else None,
                agent=bool(h.agent),
                known_hosts=os.path.expanduser(str(h.known_hosts or self.mh.known_hosts)),
                connect_timeout_s=int(self.mh.connect_timeout_s),
                control_path=f"{mux}/{i}",
            )
            label = str(h.name or (h.address if int(h.port) == 22 else f"{h.address}:{h.port}"))
            home = str(h.get("workdir") or self.workdir)
            if not home.startswith("/"):
                raise ConfigError(
                    f"cluster.hosts[{i}].workdir={home} must be an absolute path (it is quoted "
                    "on the remote command line, so ~ and $HOME are not expanded there)"
                )
            w = Worker(
                i,
                label,
                str(h.address),
                int(h.slots),
                {str(k): str(v) for k, v in (h.env or {}).items()},
                lambda cmd, stdin=False, t=target: ssh_argv(t, cmd, stdin=stdin),
                ssh_master_argv(target),
                lambda src, dest, t=target: rsync_argv(t, src, dest),
                workdir=home,
                home=home,
            )
            self._copy_over(w, target, lambda i=i, t=target: self._sftp_login(i, t))
            out.append(w)
        return out

    def _copy_over(self, w: Worker, target: SshTarget, login: Callable[[], Login]) -> None:
        """How ``w``'s run-dir pushes (storage=sync) and SFTP copies (sync's pulls, an
        object-store run dir's task logs) reach it: over ``target``, logged in as
        ``login()`` says; nothing for a shared run dir."""
        if self.storage == "sync":
            w.push = lambda src, dest, t=target: run_dir_rsync_argv(t, src, dest)
        if self.storage == "sync" or self.object_root:
            w.sftp_host = Host(
                target.address,
                target.port,
                label=f"host {w.label}",
                known_hosts=target.known_hosts,
                connect_timeout=float(target.connect_timeout_s),
                host_key_alias=target.host_key_alias,
            )
            w.login = login()

    @staticmethod
    def _sftp_login(i: int, t: SshTarget) -> Login:
        """How the SFTP pulls of ``storage=sync`` log in: the host's key file, else its
        ssh-agent, else the first of ssh's default keys (as OpenSSH would)."""
        user = t.user or getpass.getuser()
        if t.key_file:
            return Login(user, f"key file {t.key_file}", key_file=t.key_file)
        if t.agent:
            return Login(user, "ssh-agent", agent=True)
        for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
            key = os.path.expanduser(f"~/.ssh/{name}")
            if os.path.isfile(key):
                return Login(user, f"key file {key}", key_file=key)
        raise ConfigError(
            f"cluster.hosts[{i}] ({t.address}): cluster.multihost.storage=sync pulls outputs "
            "over SFTP and needs a key: set cluster.hosts[i].key_file (or "
            "cluster.multihost.key_file), or agent: true"
        )

    def workers(self) -> list[Worker]:
        if self._workers is None:
            self._workers = self.make_workers()
        return self._workers

    def _run(
        self, w: Worker, command: str, timeout: float | None = None, stdin: bytes | None = None
    ) -> tuple[int, str, str]:
        """Run ``command`` on ``w``; ``stdin``: bytes fed to it (else none: ``ssh -n``)."""
        argv = w.argv(command, stdin=stdin is not None)
        try:
            p = subprocess.run(
                argv,
                input=stdin,
                stdin=None if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout or float(self.mh.command_timeout_s),
            )
        except subprocess.TimeoutExpired:
            return SSH_FAILED, "", f"no answer within {timeout or self.mh.command_timeout_s} s"
        except FileNotFoundError as exc:
            raise ConfigError(f"cannot run {argv[0]!r}: {exc}; is it installed?") from None
        return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")

    def _rsync(self, argv: list[str], stdin: bytes, key: str, fix: str = "") -> tuple[int, str]:
        """Run an rsync argv (``stdin``: what it reads, e.g. ``--files-from=-``): (exit
        code, its stderr); a timeout counts as ssh's failure; no rsync here is an error
        naming ``key`` and the fix."""
        try:
            p = subprocess.run(
                argv, input=stdin, capture_output=True, timeout=float(self.mh.command_timeout_s)
            )
        except subprocess.TimeoutExpired:
            return SSH_FAILED, "timed out"
        except FileNotFoundError:
            raise ConfigError(
                f"{key}: no rsync on this machine; install it (`make install` does, or "
                f"apt-get install rsync){fix}"
            ) from None
        return p.returncode, p.stderr.decode(errors="replace").strip()

    def _tracked_files(self) -> tuple[str, bool, bytes]:
        """(HEAD commit, whether the tracked files differ from it, their paths NUL-separated)
        of this checkout's working tree (``git ls-files``; deleted ones left out)."""

        def git(*args: str) -> bytes:
            return _git("rsync", *args)

        commit = git("rev-parse", "HEAD").decode().strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
        names = [n for n in git("ls-files", "-z").split(b"\0") if n]
        present = [n for n in names if os.path.lexists(os.path.join(str(REPO_ROOT), n.decode()))]
        return commit, dirty, b"".join(n + b"\0" for n in present)

    def _rsync_code(self, ws: list[Worker]) -> None:
        """``code_sync=rsync``: the working tree's tracked files (committed or not) copied
        into ``workdir`` on every host at once (only what changed since the last sync); a
        host that fails it leaves the pool. The commit (and whether the tree differed from
        it) goes into every attempt record."""
        commit, dirty, files = self._tracked_files()

        def sync(w: Worker) -> tuple[int, str]:
            assert w.rsync is not None
            return self._rsync(
                w.rsync(str(REPO_ROOT), w.workdir),
                files,
                "cluster.multihost.code_sync=rsync",
                " or use code_sync=archive",
            )

        for w, (rc, err) in zip(ws, self._pool(sync, ws), strict=True):
            if rc != 0:
                w.dropped = True
                self._say(f"WARNING: host {w.label}: rsync of the code failed ({err}); left out")
        self.code = {"sync": "rsync", "commit": commit, "dirty": dirty, "dir": _dirs(ws)}
        self._say(
            f"code: the tracked files of {REPO_ROOT} (commit {commit[:12]}"
            + (", with uncommitted changes" if dirty else "")
            + f") rsynced to {_dirs(ws)} on the hosts"
        )

    def _archive(self) -> tuple[str, bytes]:
        """(commit, tar bytes) of ``git archive HEAD`` of this checkout; warns when the
        tree has changes that are not committed (they are not shipped)."""

        def git(*args: str) -> bytes:
            return _git("archive", *args)

        commit = git("rev-parse", "HEAD").decode().strip()
        if git("status", "--porcelain", "--untracked-files=no").strip():
            self._say(
                f"WARNING: code_sync=archive ships commit {commit[:12]}; the uncommitted "
                "changes of this checkout are not on the hosts"
            )
        return commit, git("archive", "--format=tar", "HEAD")

    def _ship_code(self, ws: list[Worker]) -> None:
        """``code_sync=archive``: unpack HEAD as ``workdir/COMMIT`` on every host, all
        hosts at once; a host that fails it leaves the pool. Tasks then run there."""
        commit, tar = self._archive()

        def ship(w: Worker) -> tuple[int, str]:
            try:
                p = subprocess.run(
                    w.argv(unpack_command(w.workdir, commit), stdin=True),
                    input=tar,
                    capture_output=True,
                    timeout=float(self.mh.command_timeout_s),
                )
            except subprocess.TimeoutExpired:
                return SSH_FAILED, "timed out"
            return p.returncode, p.stderr.decode(errors="replace").strip()

        for w, (rc, err) in zip(ws, self._pool(ship, ws), strict=True):
            if rc != 0:
                w.dropped = True
                self._say(f"WARNING: host {w.label}: unpacking the code failed ({err}); left out")
        self.workdir = f"{self.workdir.rstrip('/')}/{commit}"
        for w in ws:
            w.workdir = f"{w.workdir.rstrip('/')}/{commit}"
        self.code = {"sync": "archive", "commit": commit, "dir": _dirs(ws)}
        self._say(f"code: commit {commit[:12]} unpacked as {_dirs(ws)} on the hosts")

    def _host_key_error(self, w: Worker, stderr: str) -> HostKeyError | None:
        if "Host key verification failed" not in stderr and "HOST IDENTIFICATION" not in stderr:
            return None
        fp = next((ln.strip() for ln in stderr.splitlines() if "SHA256:" in ln), "")
        changed = "HOST IDENTIFICATION HAS CHANGED" in stderr
        what = "presented a host key that differs from" if changed else "is not in"
        return HostKeyError(
            f"host {w.label}: refused: its key {what} known_hosts"
            + (f" (it offered {fp})" if fp else "")
            + self._host_key_fix(w)
        )

    def _host_key_fix(self, w: Worker) -> str:
        return (
            "; if the host was reinstalled, check the fingerprint with its admin, then "
            f"replace its line (ssh-keygen -R, then ssh-keyscan {w.address} >> known_hosts)"
        )

    def _pool(self, fn, items):
        with ThreadPoolExecutor(max(1, min(len(items), int(self.mh.max_concurrent_starts)))) as ex:
            return list(ex.map(fn, items))

    def _open(self, w: Worker) -> tuple[int, str, str]:
        """Open ``w``'s master connection if it has one (its exit 0: connected, host key
        checked, logged in; the first start runs the first command on it), else run ``echo
        ok`` there."""
        if w.master:
            # stderr to a file, not a pipe: the master stays in the background holding it.
            with tempfile.TemporaryFile("w+") as err:
                try:
                    rc = subprocess.run(
                        w.master,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                        timeout=float(self.mh.command_timeout_s),
                    ).returncode
                except subprocess.TimeoutExpired:
                    return SSH_FAILED, "", "no answer"
                err.seek(0)
                if rc != 0:
                    return rc, "", err.read()
                return 0, "ok", ""
        return self._run(w, "echo ok")

    def preflight(self) -> list[Worker]:
        """Reach every worker once (in parallel); a refused host key is an error, an
        unreachable worker leaves the pool with a warning. Returns the usable ones."""
        ws = self.workers()
        results = self._pool(self._open, ws)
        # As for the probes: ssh's 255 (no connection within connect_timeout_s, which a
        # loaded machine can miss once) is asked once more before the worker is left out
        # (without a second master: the ssh uses the master if it opened, else its own).
        again = [n for n, (rc, _o, _e) in enumerate(results) if rc == SSH_FAILED]
        if again:
            answers = self._pool(lambda w: self._run(w, "echo ok"), [ws[n] for n in again])
            for n, res in zip(again, answers, strict=True):
                results[n] = res
        for w, (rc, out, err) in zip(ws, results, strict=True):
            key_error = self._host_key_error(w, err)
            if key_error:
                raise key_error
            if rc != 0 or "ok" not in out:
                w.dropped = True
                self._say(
                    f"WARNING: host {w.label} does not answer (exit {rc}: "
                    f"{err.strip()[-300:] or 'no output'}); left out of the pool"
                )
        alive = [w for w in ws if not w.dropped]
        if not alive:
            raise RemoteError("no host answers; try one by hand: " + shlex.join(ws[0].argv("true")))
        return alive

    # -- commands -----------------------------------------------------------------------

    def _remote_task(
        self, paths: RunPaths, spec: StageSpec, unit: _Unit, w: Worker, rank: int, env: dict
    ) -> RemoteTask:
        world = len(unit.placements)
        here = lambda name: self._rpath(paths, w, name)  # noqa: E731
        run_dir = (self._host_root(paths, w) if self.storage == "sync" else None) or paths.root
        identity = TaskIdentity(run_dir, spec.name, unit.task, spec.num_tasks, rank, world)
        full_env = {
            **env,
            **w.env,
            **identity_env(identity, self.name),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": w.workdir,
            "EMBEDFLEET_HOST": w.label,
            ENV_READY_FILE: here(
                paths.remote_proc(spec.stage_dir, unit.task, rank, unit.attempt, "ready")
            ),
        }
        if world > 1:
            first = unit.placements[0][0]
            full_env.update(MASTER_ADDR=first.address, MASTER_PORT=str(self._port))
        log_rank = rank if spec.kind == DISTRIBUTED else None
        return RemoteTask(
            argv=tuple(spec.command(self.python, run_dir)),
            workdir=w.workdir,
            log_file=here(RunPaths.log(spec.stage_dir, unit.task, log_rank)),
            pid_file=here(paths.remote_proc(spec.stage_dir, unit.task, rank, unit.attempt, "pid")),
            exit_file=here(
                paths.remote_proc(spec.stage_dir, unit.task, rank, unit.attempt, "exit")
            ),
            env=full_env,
            setup=tuple(str(s) for s in self.mh.setup),
            env_file=self._env.env_file,
            clear_accelerator=self.clear_accelerator,
        )

    clear_accelerator = False

    # -- storage=sync: each host's own run dir ------------------------------------------

    def _host_root(self, paths: RunPaths, w: Worker) -> str | None:
        """``w``'s own run dir under ``storage=sync`` (``HOME/runs/RUN_NAME``, a sweep
        point's sub-dir kept), where an object-store run dir's pid/exit/ready files and
        logs are too; else None (the run dir is shared)."""
        if self.storage != "sync" and not is_url(str(paths.root)):
            return None
        name = str(self.cfg.run.name).strip("/")
        base = os.path.basename(str(paths.root).rstrip("/"))
        if base != name.rsplit("/", 1)[-1]:
            name = f"{name}/{base}"
        return f"{w.home.rstrip('/')}/runs/{name}"

    def _rpath(self, paths: RunPaths, w: Worker, name: str) -> str:
        """Where the run-dir file ``name`` is on ``w``: in its own run dir under
        ``storage=sync``, else the local path (shared)."""
        root = self._host_root(paths, w)
        return f"{root}/{name}" if root else str(paths.storage.local_file(name))

    def _push(self, paths: RunPaths, ws: list[Worker]) -> None:
        """``storage=sync``: rsync the local run dir (less the launcher's records, attempts,
        logs and ``.part`` files) into every host's own run dir, all hosts at once; only
        what is missing or changed travels. A host that fails it leaves the pool."""
        local = str(paths.storage.local_file(""))

        def push(w: Worker) -> tuple[int, str]:
            assert w.push is not None
            argv = w.push(local, self._host_root(paths, w) or "")
            return self._rsync(argv, b"", "cluster.multihost.storage=sync")

        for w, (rc, err) in zip(ws, self._pool(push, ws), strict=True):
            if rc != 0:
                key_error = self._host_key_error(w, err)
                if key_error:
                    raise key_error
                w.dropped = True
                self._say(
                    f"WARNING: host {w.label}: copying the run dir there failed ({err[-300:]}); "
                    "left out"
                )

    def _pull(self, paths: RunPaths, spec: StageSpec, u: _Unit, ok: bool) -> str:
        """``storage=sync``, after ``u`` ended: its logs, and (``ok``: it exited 0) its
        outputs and marker, pulled from its first host's run dir into the local one. ""
        when done, else why not (the task then counts as failed on that host)."""
        w = u.placements[0][0]
        assert w.sftp_host is not None and w.login is not None
        root = self._host_root(paths, w) or ""
        try:
            with connect(w.sftp_host, w.login) as conn:
                sftp = conn.sftp()
                try:
                    for x, rank in u.placements:
                        if x.index != w.index:
                            continue
                        name = RunPaths.log(
                            spec.stage_dir, u.task, rank if spec.kind == DISTRIBUTED else None
                        )
                        with contextlib.suppress(RemoteError, OSError):
                            pull_file(sftp, f"{root}/{name}", paths.storage.local_file(name))
                            if self._streaming:  # _echo_host_logs echoes the rest
                                self._log_pulled.add((spec.name, _log_key(u.task, u.attempt, rank)))
                    if ok:
                        pull_task(sftp, root, paths, paths.marker(spec.stage_dir, u.task))
                finally:
                    sftp.close()
        except HostKeyError:
            raise
        except (RemoteError, OSError, paramiko.SSHException) as exc:
            return f"pulling its outputs from {w.label} failed: {str(exc)[-300:]}"
        return ""

    def _upload_logs(self, paths: RunPaths, spec: StageSpec, u: _Unit) -> None:
        """An object-store run dir, after ``u`` ended: each of its logs copied from its
        host's own run dir over SFTP into the local file the local launcher writes a log
        to, then uploaded into the run dir (``Storage.publish_log``). A log that cannot be
        fetched is warned about; the task's outcome is its marker's."""
        for w, rank in u.placements:
            name = spec.log(u.task, rank)
            assert w.sftp_host is not None and w.login is not None
            try:
                with connect(w.sftp_host, w.login) as conn:
                    sftp = conn.sftp()
                    try:
                        got = pull_file(
                            sftp, self._rpath(paths, w, name), paths.storage.local_file(name)
                        )
                    finally:
                        sftp.close()
                if got:
                    paths.storage.publish_log(name)
            except HostKeyError:
                raise
            except (RemoteError, OSError, paramiko.SSHException) as exc:
                self._say(
                    f"WARNING: [{spec.name} {u.task}] its log {self._rpath(paths, w, name)} on "
                    f"{w.label} was not uploaded to {paths.url(name)}: {str(exc)[-300:]}"
                )

    def _start_commands(self, paths: RunPaths, spec: StageSpec, unit: _Unit) -> dict[int, str]:
        by_worker: dict[int, list[RemoteTask]] = {}
        for w, rank in unit.placements:
            by_worker.setdefault(w.index, []).append(
                self._remote_task(paths, spec, unit, w, rank, self._env.plain)
            )
        names = sorted({*self._env.secret, *self._env.forwarded})
        return {i: start_command(ts, stdin_env=names) for i, ts in by_worker.items()}

    def _start_stdin(self) -> bytes | None:
        """What the start commands read on stdin: the secrets (``cluster.pass_env``, and
        those a reloaded run.yaml redacted), never on a command line or in a file."""
        return env_stdin(self._env.secret) if self._env.secret else None

    # -- the stage loop -----------------------------------------------------------------

    def _say(self, text: str) -> None:
        with self._lock:
            print(text, flush=True)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals += 1

    @contextlib.contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        self._signals = 0
        with stop_signals_to(self._on_signal):
            yield

    def _record(self, paths: RunPaths, spec: StageSpec, unit: _Unit, **fields) -> None:
        write_attempt(paths, spec, unit.task, **fields)

    def _begin(self, paths: RunPaths, spec: StageSpec, unit: _Unit, ex: ThreadPoolExecutor):
        prev = read_attempt(paths, spec, unit.task) or {}
        unit.attempt = int(prev.get("attempt") or 0) + 1
        commands = self._start_commands(paths, spec, unit)
        self._record(
            paths,
            spec,
            unit,
            launcher=self.name,
            launcher_host=socket.gethostname(),
            launcher_pid=os.getpid(),
            attempt=unit.attempt,
            placements=[
                {"worker": w.index, "host": w.label, "rank": r} for w, r in unit.placements
            ],
            host=", ".join(w.label for w in unit.workers()),
            master_port=self._port if len(unit.placements) > 1 else None,
            started=time.time(),
            ended=None,
            returncode=None,
            interrupted=None,
            command=shlex.join(spec.command(self.python, paths.root)),
            code=self.code,
        )
        for _w, rank in unit.placements:
            log = paths.storage.local_file(
                RunPaths.log(spec.stage_dir, unit.task, rank if spec.kind == DISTRIBUTED else None)
            )
            unit.log_offsets[rank] = log.stat().st_size if log.exists() else 0
        workers = {w.index: w for w in unit.workers()}

        def start() -> list[tuple[Worker, int, str]]:
            # Its turn (start_stagger_s after the previous send); none if stopped meanwhile.
            # The start phase, [start_sent, start_answered] in the attempt record, runs on
            # one of max_concurrent_starts threads.
            sent = self._clock.turn(lambda: self._signals > 0)
            if sent is None:
                return []
            self._record(paths, spec, unit, start_sent=sent)
            stdin = self._start_stdin()
            out = [
                (workers[i], *self._run(workers[i], cmd, stdin=stdin)[::2])
                for i, cmd in commands.items()
            ]
            self._record(paths, spec, unit, start_answered=time.time())
            return out

        unit.start_future = ex.submit(start)

    def _place(self, ws: list[Worker], busy: dict[int, int], world: int, avoid: set[int]):
        """``world`` free slots, on workers not in ``avoid`` while those have enough slots
        in all (waiting for one of them to free up rather than going back to a host that
        failed the task); None when not enough are free now. Under ``storage=sync`` the
        ranks of a distributed task share one host (they read each other's files)."""
        alive = [w for w in ws if not w.dropped]
        preferred = [w for w in alive if w.index not in avoid]
        if self.storage == "sync" and world > 1:
            pool = preferred if any(w.slots >= world for w in preferred) else alive
            return next(
                ([w] * world for w in pool if w.slots - busy.get(w.index, 0) >= world), None
            )
        pool = preferred if sum(w.slots for w in preferred) >= world else alive
        out: list[Worker] = []
        for w in pool:
            free = w.slots - busy.get(w.index, 0)
            out.extend([w] * max(0, min(free, world - len(out))))
        return out if len(out) == world else None

    def _host_failed(self, w: Worker, why: str) -> None:
        w.failures += 1
        if w.failures >= int(self.mh.host_failures_to_drop) and not w.dropped:
            w.dropped = True
            self._say(
                f"WARNING: host {w.label} failed {w.failures} times ({why}); taken out of the pool"
            )

    def _kill_unit(self, paths: RunPaths, spec: StageSpec, unit: _Unit) -> None:
        files: dict[int, list[str]] = {}
        for w, rank in unit.placements:
            pf = self._rpath(
                paths, w, paths.remote_proc(spec.stage_dir, unit.task, rank, unit.attempt, "pid")
            )
            files.setdefault(w.index, []).append(pf)
        ws = {w.index: w for w in unit.workers()}
        self._pool(lambda i: self._run(ws[i], kill_command(files[i]), timeout=30), list(files))

    def _probe(self, paths: RunPaths, spec: StageSpec, units: list[_Unit]):
        """(worker index -> {key: (state, code)}) or None for a worker that did not answer."""
        entries: dict[int, list[tuple[str, str, str]]] = {}
        ws: dict[int, Worker] = {}
        for u in units:
            for w, rank in u.placements:
                ws[w.index] = w
                proc = lambda kind, u=u, w=w, rank=rank: self._rpath(  # noqa: E731
                    paths, w, paths.remote_proc(spec.stage_dir, u.task, rank, u.attempt, kind)
                )
                entries.setdefault(w.index, []).append(
                    (_key(u.task, rank), proc("pid"), proc("exit"), proc("ready"))
                )
        idx = list(entries)

        def probe(i: int):
            return self._run(ws[i], self._probe_command(paths, spec, units, ws[i], entries[i]))

        results = self._pool(probe, idx)
        # A host that did not answer (ssh's 255: no connection within connect_timeout_s,
        # which a loaded machine can miss once) is asked once more before it counts as
        # not answering (its tasks then fail there and run elsewhere).
        again = [n for n, (rc, _o, _e) in enumerate(results) if rc == SSH_FAILED]
        if again:
            for n, res in zip(again, self._pool(probe, [idx[n] for n in again]), strict=True):
                results[n] = res
        out: dict[int, dict[str, tuple[str, int | None]] | None] = {}
        for i, (rc, stdout, _err) in zip(idx, results, strict=True):
            if rc != 0:
                out[i] = None
                continue
            stdout = self._keep_log_reads(spec, stdout)
            states = {}
            for line in stdout.splitlines():
                parts = line.split()
                if len(parts) >= 2:
                    code = int(parts[2]) if parts[1] == "exit" and len(parts) > 2 else None
                    states[parts[0]] = (parts[1], code)
            out[i] = states
        return out

    def _echo_logs(self, paths: RunPaths, spec: StageSpec, unit: _Unit) -> None:
        if not (self.echo and self.attach):
            return
        if self.storage == "sync":
            self._echo_host_logs(paths, spec, unit)
            return
        for w, rank in unit.placements:
            log = paths.storage.local_file(
                RunPaths.log(spec.stage_dir, unit.task, rank if spec.kind == DISTRIBUTED else None)
            )
            if not log.exists():
                continue
            with open(log, "rb") as fh:
                fh.seek(unit.log_offsets.get(rank, 0))
                data = fh.read()
            cut = data.rfind(b"\n") + 1
            unit.log_offsets[rank] = unit.log_offsets.get(rank, 0) + cut
            self._say_log(w, spec, unit, rank, data[:cut])

    def _say_log(self, w: Worker, spec: StageSpec, unit: _Unit, rank: int, data: bytes) -> None:
        """``data``'s lines, each prefixed ``[host stage task]`` (`` rR`` with ranks)."""
        r = f" r{rank}" if len(unit.placements) > 1 else ""
        for line in data.decode(errors="replace").splitlines():
            self._say(f"[{w.label} {spec.name} {unit.task}{r}] {line.rsplit(chr(13), 1)[-1]}")

    # -- storage=sync: live logs from the hosts -----------------------------------------

    def _probe_command(
        self, paths: RunPaths, spec: StageSpec, units: list[_Unit], w: Worker, entries
    ) -> str:
        """``probe_command(entries)`` for ``w``; while logs stream (storage=sync,
        --attach) followed on the same ssh by the new bytes of the logs of ``units``'
        processes on ``w`` (``log_read_command``), bounded per round."""
        command = probe_command(entries)
        if not self._streaming:
            return command
        reads = []
        for u in units:
            for x, rank in u.placements:
                if x.index == w.index:
                    key = _log_key(u.task, u.attempt, rank)
                    log = self._rpath(paths, w, spec.log(u.task, rank))
                    reads.append((key, log, self._log_sent.get((spec.name, key), 0)))
        if not reads:
            return command
        each = max(LOG_READ_MIN_BYTES, min(LOG_READ_BYTES, LOG_READ_HOST_BYTES // len(reads)))
        return f"{command}; {log_read_command([(k, f, o, each) for k, f, o in reads])}"

    def _keep_log_reads(self, spec: StageSpec, stdout: str) -> str:
        """``stdout`` of a probe less its log reads, kept for ``_echo_host_logs``."""
        rest, reads = parse_log_reads(stdout)
        for key, got in reads.items():
            if got is not None:
                self._log_reads[(spec.name, key)] = got
        return rest

    def _echo_host_logs(self, paths: RunPaths, spec: StageSpec, unit: _Unit) -> None:
        """storage=sync: echo what the last probe read of ``unit``'s logs on its host (its
        whole lines; a line longer than a round's read comes in pieces), and once its log
        was pulled (the task ended) the rest of it from the local copy, last line too."""
        for w, rank in unit.placements:
            k = (spec.name, _log_key(unit.task, unit.attempt, rank))
            sent = self._log_sent.get(k, 0)
            if k in self._log_pulled:
                self._log_pulled.discard(k)
                self._log_reads.pop(k, None)
                self._log_sent.pop(k, None)
                log = paths.storage.local_file(spec.log(unit.task, rank))
                if log.exists():
                    with open(log, "rb") as fh:
                        fh.seek(sent)
                        self._say_log(w, spec, unit, rank, fh.read())
                continue
            got = self._log_reads.pop(k, None)
            if got is None:
                continue
            size, data = got
            if size < sent:  # the host's log was replaced: from its start again
                self._log_sent[k] = 0
                continue
            cut = data.rfind(b"\n") + 1
            if cut == 0 and len(data) >= LOG_READ_MIN_BYTES:
                cut = len(data)
            self._log_sent[k] = sent + cut
            self._say_log(w, spec, unit, rank, data[:cut])

    def live_log(self, paths: RunPaths, spec: StageSpec, task: int, rank: int) -> LiveLog | None:
        """storage=sync, or an object-store run dir: the log of ``task`` read from its
        host's own run dir (the host its attempt record names) while the attempt runs, or
        when it ended without its log pulled back (uploaded, on an object store); None
        when the run dir's copy is the log (storage=shared on a path, pulled, uploaded)."""
        uploaded = is_url(str(paths.root))
        if self.storage != "sync" and not uploaded:
            return None
        rec = read_attempt(paths, spec, task) or {}
        if rec.get("launcher") != self.name or not rec.get("attempt"):
            return None
        name = spec.log(task, rank)
        if rec.get("ended") and (
            paths.storage.exists(name) if uploaded else paths.storage.local_file(name).exists()
        ):
            return None
        place = next(
            (p for p in rec.get("placements") or [] if int(p.get("rank", -1)) == rank), None
        )
        if place is None:
            return None
        what = f"{spec.name} task {task}" + (f" rank {rank}" if spec.kind == DISTRIBUTED else "")
        w = next((x for x in self.workers() if x.index == int(place["worker"])), None)
        if w is None or w.label != place.get("host"):
            slot = (
                f"cluster.hosts[{place['worker']}]"
                if self.name == "hosts"
                else f"worker {place['worker']} of cluster.tpu_vm"
            )
            raise ConfigError(
                f"{what} ran on host {place.get('host')}, which is no longer {slot} in "
                f"{paths.url(paths.run_config)}: its log is in that host's run dir "
                "(WORKDIR/runs/RUN_NAME)"
            )
        where = self._rpath(paths, w, name)
        rc, out, err = self._run(w, log_read_command([("log0", where, 0, None)]))
        if rc != 0:
            key_error = self._host_key_error(w, err)
            if key_error:
                raise key_error
            local = paths.storage.local_file(name)
            raise RemoteError(
                f"cannot read the log of {what} from host {w.label} ({where}): exit {rc}: "
                f"{err.strip()[-300:] or 'no output'}; is the host up? "
                + (
                    f"It is uploaded to {paths.url(name)} when the task ends"
                    if uploaded
                    else f"An older copy is local: {local}"
                    if local.exists()
                    else "It comes back when the task ends (pulled with its outputs)"
                )
            )
        got = parse_log_reads(out)[1].get("log0")
        if got is None:
            raise EmbedfleetError(f"no log yet for {what} on host {w.label}: {where}")
        how = "uploaded" if uploaded else "pulled back"
        state = "running" if not rec.get("ended") else f"ended; its log was not {how}"
        return LiveLog(got[1], f"host {w.label}: {where} ({state})")

    def _run_stage(self, paths: RunPaths, spec: StageSpec, pending: list[int]) -> list[int]:
        ws = [w for w in self.workers() if not w.dropped]
        world = spec.world_size if spec.kind == DISTRIBUTED else 1
        total = sum(w.slots for w in ws)
        if world > total:
            raise ConfigError(
                f"{spec.name} runs {world} ranks, one per slot, but the hosts have {total} "
                f"slot(s) ({', '.join(f'{w.label}: {w.slots}' for w in ws)}); add hosts or "
                "slots (cluster.hosts[i].slots) or lower the stage's world size"
            )
        if self.storage == "sync" and world > max(w.slots for w in ws):
            raise ConfigError(
                f"{spec.name} runs {world} ranks that read each other's files in the run dir; "
                "with cluster.multihost.storage=sync each host has its own run dir, so they "
                f"run on one host, but none has {world} slots "
                f"({', '.join(f'{w.label}: {w.slots}' for w in ws)}): give one host that many "
                "(cluster.hosts[i].slots), lower the stage's world size, or use "
                "cluster.multihost.storage=shared with a run dir every host mounts"
            )
        running: list[_Unit] = []
        busy: dict[int, int] = {}
        started_units: list[_Unit] = []  # for on_started: started (or adopted) here
        for u in self._adopt(paths, spec, pending):
            running.append(u)
            started_units.append(u)
            for w, _ in u.placements:
                busy[w.index] = busy.get(w.index, 0) + 1
        adopted = {u.task for u in running}
        queue: list[tuple[int, int, set[int]]] = [
            (t, 1, set()) for t in pending if t not in adopted
        ]
        failed: list[int] = []
        retries = int(self.mh.max_task_retries)
        starts_at_once = int(self.mh.max_concurrent_starts)
        ex = ThreadPoolExecutor(starts_at_once)
        # storage=sync: pulls of ended tasks run beside the loop (a large output does not
        # hold up the probes and starts of the other tasks); a task's end is handled once
        # its pull answered.
        pulls = ThreadPoolExecutor(max(1, min(8, len(ws))))
        pulling: list[tuple[_Unit, str, list[Worker], Future]] = []
        last_poll = 0.0
        try:
            while queue or running or pulling:
                if self._signals:
                    self._stop(paths, spec, running)
                    raise _Interrupted()
                if queue and not any(not w.dropped for w in self.workers()):
                    raise RemoteError(
                        f"{spec.name}: every host has left the pool; tasks "
                        f"{compress_indices(sorted(t for t, _, _ in queue))} did not run"
                    )
                loading = sum(1 for u in running if not u.ready)
                for item in list(queue):
                    if loading >= starts_at_once:
                        break  # that many still load: the next start waits for one
                    task, tries, avoid = item
                    placed = self._place(self.workers(), busy, world, avoid)
                    if placed is None:
                        continue
                    queue.remove(item)
                    ranks = [(w, r) for r, w in enumerate(placed)]
                    unit = _Unit(task, 0, tries, ranks, avoid)
                    for w in placed:
                        busy[w.index] = busy.get(w.index, 0) + 1
                    self._begin(paths, spec, unit, ex)
                    running.append(unit)
                    loading += 1
                time.sleep(min(0.05, float(self.mh.poll_s)))
                finished: list[tuple[_Unit, str, list[Worker]]] = []  # (unit, why, bad hosts)
                for u in running:
                    f = u.start_future
                    if f is not None and f.done():
                        u.start_future = None
                        answers = f.result()
                        for w, rc, err in answers:
                            if rc != 0:
                                key_error = self._host_key_error(w, err)
                                if key_error:
                                    raise key_error
                                why = f"could not start on {w.label} (exit {rc}: {err.strip()[-200:]})"
                                finished.append((u, why, [w] if rc == SSH_FAILED else []))
                                break
                        else:
                            if answers:
                                started_units.append(u)
                if time.time() - last_poll >= float(self.mh.poll_s):
                    last_poll = time.time()
                    started = [
                        u
                        for u in running
                        if u.start_future is None and u not in [x[0] for x in finished]
                    ]
                    states = self._probe(paths, spec, started) if started else {}
                    for u in started:
                        self._echo_logs(paths, spec, u)
                        if not u.ready and self._loaded(u, states):
                            u.ready = True
                            self._record(paths, spec, u, ready=time.time())
                        outcome = self._outcome(u, states)
                        if outcome is not None:
                            finished.append((u, *outcome))
                ended: list[tuple[_Unit, str, list[Worker]]] = []
                for u, why, bad in finished:
                    running.remove(u)
                    for w in u.workers():
                        busy[w.index] -= sum(1 for x, _ in u.placements if x.index == w.index)
                    if self.storage == "sync":
                        pull = pulls.submit(self._pull, paths, spec, u, why == "")
                        pulling.append((u, why, bad, pull))
                        continue
                    if is_url(str(paths.root)):
                        self._upload_logs(paths, spec, u)
                        u.log_offsets.clear()  # its log came whole from the host
                    ended.append((u, why, bad))
                for item in [x for x in pulling if x[3].done()]:
                    pulling.remove(item)
                    u, why, bad, pull = item
                    pulled = pull.result()  # a changed host key raises here
                    u.log_offsets.clear()  # its log came whole from the host
                    if pulled and why == "":
                        why, bad = pulled, [u.placements[0][0]]
                    ended.append((u, why, bad))
                for u, why, bad in ended:
                    self._echo_logs(paths, spec, u)
                    ok = why == "" and check_marker(paths, spec.stage_dir, u.task, spec.config_hash)
                    if why == "" and not ok:
                        why = "it exited 0 without a completion marker"
                    if why and len(u.placements) > 1:
                        self._kill_unit(paths, spec, u)  # its other ranks would wait forever
                    code = 0 if ok else 1
                    self._record(
                        paths, spec, u, ended=time.time(), returncode=code, reason=why or None
                    )
                    if ok:
                        continue
                    for w in bad:
                        self._host_failed(w, why)
                    log = paths.url(spec.log(u.task))
                    if self.mh.fail_fast:
                        self._say(
                            f"[{spec.name} {u.task}] FAILED ({why}); log: {log}; fail_fast: stopping"
                        )
                        self._stop(paths, spec, running)
                        return sorted({*failed, u.task, *(t for t, _, _ in queue)})
                    if u.tries <= retries:
                        avoid = u.avoid | {w.index for w, _ in u.placements}
                        self._say(
                            f"[{spec.name} {u.task}] failed on {', '.join(w.label for w in u.workers())} "
                            f"({why}); retry {u.tries} of {retries} on another host"
                        )
                        queue.insert(0, (u.task, u.tries + 1, avoid))
                    else:
                        failed.append(u.task)
                        self._say(f"[{spec.name} {u.task}] FAILED ({why}); log: {log}")
                if (
                    self.on_started is not None
                    and started_units
                    and all(u.start_future is None for u in running)
                ):
                    # The starts sent so far have answered and some task started (it may
                    # have ended already: a fast task, or one that failed and waits to
                    # be retried).
                    tell, self.on_started = self.on_started, None
                    tell(spec, list(started_units))
        finally:
            ex.shutdown(wait=True)
            pulls.shutdown(wait=True)
        return sorted(failed)

    def _adopt(self, paths: RunPaths, spec: StageSpec, pending: list[int]) -> list[_Unit]:
        """Tasks an earlier launcher of this run started that still run on their hosts
        (it was killed; they were not): followed, not started a second time."""
        live = [
            (u, rec)
            for s, u, rec in self._live_units(paths, Plan([spec], 0))
            if u.task in pending and not rec.get("ended") and rec.get("launcher_pid") != os.getpid()
        ]
        if not live:
            return []
        states = self._probe(paths, spec, [u for u, _ in live])
        out = []
        for u, _rec in live:
            if any(w.dropped for w in u.workers()):
                continue
            if self._outcome(u, states) is None or all(
                (states.get(w.index) or {}).get(_key(u.task, r), ("", None))[0] == "exit"
                for w, r in u.placements
            ):
                u.tries = 1
                self._say(
                    f"[{spec.name} {u.task}] adopting attempt {u.attempt} on "
                    f"{', '.join(w.label for w in u.workers())} from an earlier launcher"
                )
                self._record(paths, spec, u, adopted_by=os.getpid(), launcher_pid=os.getpid())
                out.append(u)
        return out

    def _loaded(self, u: _Unit, states) -> bool:
        """Whether every process of ``u`` is past its start phase: ready (its ready file
        is there) or ended."""
        for w, rank in u.placements:
            state = ((states.get(w.index) or {}).get(_key(u.task, rank)) or ("starting",))[0]
            if state not in ("running", "exit", "vanished"):
                return False
        return True

    def _outcome(self, u: _Unit, states) -> tuple[str, list[Worker]] | None:
        """None while the unit runs; else (why it failed or "", hosts to blame)."""
        codes = []
        for w, rank in u.placements:
            host_states = states.get(w.index)
            if host_states is None:
                return f"host {w.label} does not answer", [w]
            state, code = host_states.get(_key(u.task, rank), ("starting", None))
            if state == "vanished":
                return f"its process on {w.label} is gone without an exit code", [w]
            if state == "exit" and code not in (0, None):
                return f"exit code {code} on {w.label}", []
            codes.append(state == "exit")
        return ("", []) if all(codes) else None

    def _stop(self, paths: RunPaths, spec: StageSpec, running: list[_Unit]) -> None:
        for u in running:
            if u.start_future is not None:
                with contextlib.suppress(Exception):
                    u.start_future.result(timeout=float(self.mh.command_timeout_s))
        self._pool(lambda u: self._kill_unit(paths, spec, u), running) if running else None
        for u in running:
            self._record(paths, spec, u, ended=time.time(), returncode=None, interrupted=True)
        if running:
            self._say(f"{spec.name}: stopped {len(running)} task(s) on the hosts")

    @property
    def attach(self) -> bool:
        return bool(self.mh.attach)

    # -- launch -------------------------------------------------------------------------

    def _require_shared(self, paths: RunPaths) -> None:
        if "://" not in str(paths.root):
            return
        if self.storage == "sync":
            raise ConfigError(
                f"cluster.multihost.storage=sync copies each host's run dir back into a local "
                f"run dir, not {paths.root}: set run.root to a local path (run.root=/data/runs), "
                "or use storage=shared (the default), which writes it in the bucket from "
                "every host"
            )
        self._refuse_object_store(paths)
        if not self._own_workdir:
            each = (
                " (or cluster.hosts[i].workdir on every host)"
                if self.name == "hosts"
                else " (it may hold {worker}: workers sharing a file system each get their own)"
            )
            raise ConfigError(
                f"cluster={self.name} with an object-store run dir ({paths.root}) keeps each "
                "host's pid/exit files and task logs under its workdir (WORKDIR/runs/RUN_NAME): "
                f"set cluster.multihost.workdir{each}, an absolute path"
            )

    def _refuse_object_store(self, paths: RunPaths) -> None:
        """Raises ``ConfigError`` when this launcher cannot copy the task logs of an
        object-store run dir (``paths``) from its workers (the hosts' SFTP always can)."""

    def _choose_port(self, paths: RunPaths, plan: Plan) -> int:
        """The rendezvous port of this run: the one an earlier attempt recorded, else a
        fresh one (the same for every distributed stage of the run)."""
        for spec in plan.stages:
            for t in range(spec.num_tasks):
                rec = read_attempt(paths, spec, t) or {}
                if rec.get("master_port"):
                    return int(rec["master_port"])
        return PORT_BASE + random.randrange(PORT_SPAN)

    def start(
        self, paths: RunPaths, plan: Plan, *, dry_run: bool = False, lock: RunLock | None = None
    ) -> LaunchResult:
        """From the command line: the stage loop in a detached scheduler process that takes
        over ``lock`` (returns once the first tasks run), or here with ``--attach``."""
        if self.attach:
            return self.launch(paths, plan, dry_run=dry_run)
        from launchers.hosts.detached import scheduler_argv, start_detached

        if dry_run:
            self._say(
                "# detached (the default; --attach: in the foreground): a background "
                f"scheduler runs what follows: {shlex.join(scheduler_argv(str(paths.root)))}"
            )
            return self.launch(paths, plan, dry_run=True)
        self._require_shared(paths)
        # A cluster.pass_env name not set here is an error now, not in the scheduler.
        task_env(self.cfg.cluster, literal_secrets=False, launcher=self.name)
        return start_detached(paths, lock, say=self._say)

    def launch(self, paths: RunPaths, plan: Plan, *, dry_run: bool = False) -> LaunchResult:
        """Run every stage of ``plan`` here, in the foreground, until done or failed."""
        from launchers.hosts.detached import scheduler_log_location

        self._require_shared(paths)
        self._env = task_env(
            self.cfg.cluster, literal_secrets=False, launcher=self.name, check_environ=not dry_run
        )
        self._port = self._choose_port(paths, plan)
        self._streaming = self.storage == "sync" and self.echo and self.attach
        if dry_run:
            self._dry_run(paths, plan)
            return LaunchResult(False, False, {})
        paths.storage.publish_json(
            paths.scheduler,
            {
                "launcher": self.name,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "process_start": process_start(os.getpid()),
                "started": time.time(),
                "detached": self.detached,
                "log": scheduler_log_location(paths) if self.detached else None,
                "ended": None,
                "result": None,
            },
        )
        outcome = "error"
        try:
            result = self._launch_stages(paths, plan)
            if result.interrupted is not None:
                outcome = "stopped (cancel, or a signal): its tasks were stopped"
            elif result.failed:
                stage, tasks = next(iter(result.failed.items()))
                outcome = f"{stage} task(s) {compress_indices(tasks)} failed"
            else:
                outcome = "all stages complete"
            return result
        except Exception as exc:
            outcome = f"error: {str(exc)[:500]}"
            raise
        finally:
            self._end_scheduler(paths, outcome)

    def _end_scheduler(self, paths: RunPaths, outcome: str) -> None:
        rec = paths.storage.read_json(paths.scheduler) or {}
        if rec.get("pid") == os.getpid() and not rec.get("ended"):
            rec.update(ended=time.time(), result=outcome)
            paths.storage.publish_json(paths.scheduler, rec)

    def _launch_stages(self, paths: RunPaths, plan: Plan) -> LaunchResult:
        alive = self.preflight()
        if self.code_sync == "archive":
            self._ship_code(alive)
            alive = [w for w in alive if not w.dropped]
        elif self.code_sync == "rsync":
            self._rsync_code(alive)
            alive = [w for w in alive if not w.dropped]
        if not alive:
            raise RemoteError("no host is left to run tasks on (see the warnings above)")
        self._say(
            f"{self.name}: {len(alive)} host(s), {sum(w.slots for w in alive)} slot(s): "
            + ", ".join(f"{w.label} x{w.slots}" for w in alive)
        )
        with self._signals_deferred():
            try:
                for spec in plan.stages:
                    done = completed_tasks(paths, spec)
                    pending = [t for t in range(spec.num_tasks) if t not in done]
                    if not pending:
                        self._say(f"{spec.name}: all {spec.num_tasks} task(s) already complete")
                        continue
                    self._say(
                        f"{spec.name}: running {compress_indices(pending)} of {spec.num_tasks} "
                        "task(s) on the hosts"
                    )
                    t0 = time.time()
                    if self.storage == "sync":
                        self._push(paths, [w for w in self.workers() if not w.dropped])
                    bad = self._run_stage(paths, spec, pending)
                    if bad:
                        return LaunchResult(False, False, {spec.name: bad})
                    self._say(f"{spec.name}: done in {time.time() - t0:.1f}s")
            except _Interrupted:
                self._say("interrupted: the tasks on the hosts were stopped; rerun to resume")
                return LaunchResult(False, False, {}, interrupted=1)
        return LaunchResult(True, False, {})

    def _dry_run(self, paths: RunPaths, plan: Plan) -> None:
        ws = self.workers()
        slots = [w for w in ws for _ in range(w.slots)]
        if self.code_sync == "archive":
            self._say("# code: git archive --format=tar HEAD, fed to each host:")
            for w in ws:
                cmd = unpack_command(w.workdir, "0" * 40)
                self._say(
                    f"$ git archive --format=tar HEAD | {shlex.join(w.argv(cmd, stdin=True))}"
                )
                w.workdir = f"{w.workdir.rstrip('/')}/COMMIT"
            self.workdir = f"{self.workdir.rstrip('/')}/COMMIT"
        elif self.code_sync == "rsync":
            self._say(f"# code: the tracked files of {REPO_ROOT}, copied to each host:")
            for w in ws:
                assert w.rsync is not None
                argv = w.rsync(str(REPO_ROOT), w.workdir)
                self._say(
                    f"$ git -C {shlex.quote(str(REPO_ROOT))} ls-files -z | {shlex.join(argv)}"
                )
        if self.storage == "sync":
            self._say(
                "# storage=sync: before each stage the local run dir is copied into each "
                "host's own; when a task exits 0 its outputs, then its marker, are pulled "
                "back over SFTP (sha256-verified against the marker)"
            )
            local = str(paths.storage.local_file(""))
            for w in ws:
                assert w.push is not None
                self._say(f"$ {shlex.join(w.push(local, self._host_root(paths, w) or ''))}")
        secrets = sorted({*self._env.secret, *self._env.forwarded})
        if secrets:
            self._say(
                "# each start command reads on its stdin, from this environment: "
                + " ".join(f"{n}=<value of ${n}>" for n in secrets)
            )
        for spec in plan.stages:
            done = completed_tasks(paths, spec)
            pending = [t for t in range(spec.num_tasks) if t not in done]
            if not pending:
                self._say(f"{spec.name}: all {spec.num_tasks} task(s) already complete")
                continue
            world = spec.world_size if spec.kind == DISTRIBUTED else 1
            self._say(
                f"# {spec.name}: tasks {compress_indices(pending)} of {spec.num_tasks}; hosts "
                "are taken as slots free up (shown: the first placement)"
            )
            for n, task in enumerate(pending):
                placed = [slots[(n * world + r) % len(slots)] for r in range(world)]
                unit = _Unit(task, 1, 1, [(w, r) for r, w in enumerate(placed)])
                for i, cmd in self._start_commands(paths, spec, unit).items():
                    if secrets:
                        self._say(
                            f"$ <the NAME=VALUE lines> | {shlex.join(ws[i].argv(cmd, stdin=True))}"
                        )
                    else:
                        self._say(f"$ {shlex.join(ws[i].argv(cmd))}")

    # -- watching -----------------------------------------------------------------------

    def _live_units(self, paths: RunPaths, plan: Plan):
        """(spec, unit) of every attempt record of this launcher not marked ended."""
        ws = {w.index: w for w in self.workers()}
        out = []
        for spec in plan.stages:
            for t in range(spec.num_tasks):
                rec = read_attempt(paths, spec, t)
                if not rec or rec.get("launcher") != self.name or not rec.get("attempt"):
                    continue
                placements = [
                    (ws[p["worker"]], int(p["rank"]))
                    for p in rec.get("placements", [])
                    if p["worker"] in ws
                ]
                if placements:
                    unit = _Unit(t, int(rec["attempt"]), 0, placements)
                    out.append((spec, unit, rec))
        return out

    def scheduler_view(self, paths: RunPaths, plan: Plan) -> SchedulerView:
        """From the attempt records and one probe per host: running, failed (exit code,
        the last log lines) or vanished; tasks of an unreachable host say so."""
        view: SchedulerView = {}
        units = self._live_units(paths, plan)
        by_stage: dict[str, list] = {}
        for spec, unit, rec in units:
            by_stage.setdefault(spec.name, []).append((spec, unit, rec))
        self._host_states = {w.label: (True, [], []) for w in self.workers()}
        for entries in by_stage.values():
            spec = entries[0][0]
            probing = [u for _, u, rec in entries if not rec.get("ended")]
            states = self._probe(paths, spec, probing) if probing else {}
            done = completed_tasks(paths, spec)
            for _, u, rec in entries:
                hosts = ", ".join(w.label for w in u.workers())
                if u.task not in done:
                    self._note_hosts(spec, u, rec, states)
                if rec.get("ended"):
                    if rec.get("interrupted"):
                        view[(spec.name, u.task)] = (PENDING, "stopped; rerun to resume")
                    elif rec.get("returncode"):
                        view[(spec.name, u.task)] = (
                            FAILED,
                            f"{rec.get('reason') or 'failed'}{self._tail(paths, spec, u.task)}",
                        )
                    continue
                outcome = self._outcome(u, states)
                if outcome is None:
                    view[(spec.name, u.task)] = (RUNNING, f"on {hosts}")
                elif outcome[0] == "":
                    view[(spec.name, u.task)] = (PENDING, f"exited 0 on {hosts} without marker")
                else:
                    view[(spec.name, u.task)] = (
                        FAILED,
                        f"{outcome[0]}{self._tail(paths, spec, u.task)}",
                    )
        return view

    def _note_hosts(self, spec: StageSpec, u: _Unit, rec: dict, states) -> None:
        """What ``status_notes`` says per host about the unit ``u`` (a task not done)."""
        what = f"{spec.name} {u.task}"
        for w in u.workers():
            _, running, failed = self._host_states.setdefault(w.label, (True, [], []))
            if rec.get("ended"):
                if rec.get("returncode") and not rec.get("interrupted"):
                    failed.append(what)
                continue
            if states.get(w.index) is None:
                running.append(what)
                self._host_states[w.label] = (False, running, failed)
                continue
            outcome = self._outcome(u, states)
            (running if outcome is None else failed).append(what)

    def _scheduler_record(self, paths: RunPaths) -> dict | None:
        rec = paths.storage.read_json(paths.scheduler)
        return rec if isinstance(rec, dict) and rec.get("pid") else None

    def scheduler_alive(self, paths: RunPaths) -> bool | None:
        """Whether the process that runs this run's stage loop (detached or not) lives:
        None without a record, or when it ran on another host (not to be told from here)."""
        rec = self._scheduler_record(paths)
        if rec is None:
            return None
        if rec.get("ended"):
            return False
        if rec.get("host") != socket.gethostname():
            return None
        return process_alive(int(rec["pid"]), rec.get("process_start"))

    def status_notes(self, paths: RunPaths, plan: Plan) -> list[str]:
        """The scheduler (running, ended and how, or gone) and, per host, the tasks that
        run there, failed there, or that it does not answer about (after scheduler_view)."""
        lines = []
        rec = self._scheduler_record(paths)
        if rec is not None:
            pid, host = int(rec["pid"]), str(rec.get("host"))
            when = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))  # noqa: E731
            how = "detached" if rec.get("detached") else "in the foreground"
            log = f"; its log: {rec['log']}" if rec.get("log") else ""
            alive = self.scheduler_alive(paths)
            if rec.get("ended"):
                lines.append(
                    f"scheduler: ended {when(rec['ended'])} ({rec.get('result') or '?'}); "
                    f"pid {pid} on {host}{log}"
                )
            elif alive:
                lines.append(
                    f"scheduler: running (pid {pid} on {host}, {how}, since "
                    f"{when(rec.get('started') or 0)}){log}"
                )
            elif alive is None:
                lines.append(
                    f"scheduler: pid {pid} on {host} ({how}): on another host, not checked "
                    "from here"
                )
            else:
                lines.append(
                    f"scheduler gone: pid {pid} on {host} is no longer running and did not "
                    f"finish{log}. Relaunch to resume (the same command, or `python launch.py "
                    f"retry {paths.root}`): tasks still running are adopted"
                )
        if any(r or f or not a for a, r, f in self._host_states.values()):
            lines.append("hosts:")
            for label, (answered, running, failed) in self._host_states.items():
                parts = []
                if not answered:
                    parts.append("does not answer")
                if running:
                    parts.append(("ran " if not answered else "running ") + ", ".join(running))
                if failed:
                    parts.append("failed " + ", ".join(failed))
                lines.append(f"  {label}: {'; '.join(parts) or 'no task running'}")
        return lines

    def _tail(self, paths: RunPaths, spec: StageSpec, task: int, n: int = 3) -> str:
        log = paths.storage.local_file(spec.log(task))
        if not log.exists():
            return ""
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-n:]
        return ("; last log lines: " + " | ".join(lines)) if lines else ""

    def _stop_scheduler(self, paths: RunPaths) -> None:
        """SIGTERM the run's scheduler (it stops its tasks and records them stopped) and
        wait for it to end; SIGKILL it if it has not within the time a stop may take."""
        rec = self._scheduler_record(paths)
        if rec is None or rec.get("ended") or int(rec["pid"]) == os.getpid():
            return
        pid, start, host = int(rec["pid"]), rec.get("process_start"), rec.get("host")
        if host != socket.gethostname():
            self._say(
                f"WARNING: the scheduler of the run runs on {host} (pid {pid}): stop it there "
                f"(kill {pid}); it may start again what this kills"
            )
            return
        if process_alive(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.time() + float(self.mh.command_timeout_s) + 30
            while process_alive(pid, start) and time.time() < deadline:
                time.sleep(0.1)
            if process_alive(pid, start):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                while process_alive(pid, start) and time.time() < deadline + 10:
                    time.sleep(0.1)
            self._say(f"stopped the scheduler (pid {pid} on {host})")
        rec = self._scheduler_record(paths) or rec
        if not rec.get("ended"):
            rec.update(ended=time.time(), result="cancelled")
            paths.storage.publish_json(paths.scheduler, rec)

    def cancel(self, paths: RunPaths, plan: Plan) -> int:
        """Stop the scheduler of this run (it would retry what is killed: detached, or a
        foreground launcher here), then kill every recorded task process group on every
        host. Returns how many task process groups were stopped."""
        before = self._live_units(paths, plan)
        live = {(s.name, u.task, u.attempt) for s, u, rec in before if not rec.get("ended")}
        self._stop_scheduler(paths)
        launchers = set()
        units = self._live_units(paths, plan)
        stopped = sum(
            len(u.placements)
            for s, u, rec in units
            if (s.name, u.task, u.attempt) in live and rec.get("interrupted")
        )
        for _, _, rec in units:
            if rec.get("launcher_host") == socket.gethostname() and rec.get("launcher_pid"):
                launchers.add(int(rec["launcher_pid"]))
        for pid in launchers - {os.getpid()}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        files: dict[int, list[str]] = {}
        ws: dict[int, Worker] = {}
        for spec, u, _rec in units:
            for w, rank in u.placements:
                ws[w.index] = w
                files.setdefault(w.index, []).append(
                    self._rpath(
                        paths, w, paths.remote_proc(spec.stage_dir, u.task, rank, u.attempt, "pid")
                    )
                )
        if not files:
            return stopped
        idx = list(files)
        results = self._pool(lambda i: self._run(ws[i], kill_command(files[i]), timeout=60), idx)
        count = stopped
        for i, (rc, out, err) in zip(idx, results, strict=True):
            if rc != 0:
                self._say(f"WARNING: cannot reach {ws[i].label} to stop its tasks: {err.strip()}")
                continue
            with contextlib.suppress(ValueError):
                count += int(out.strip().splitlines()[-1])
        return count


class TpuVmLauncher(HostsLauncher):
    """TPU VM workers: every remote command is ``gcloud compute tpus tpu-vm ssh NAME
    --worker=i --command=...``, one process per worker; the workers of each TPU are read
    with ``gcloud compute tpus tpu-vm describe``; stale accelerator holders are cleared
    before each task (``cluster.tpu_vm.clear_accelerator_holders``).

    Copies of files (``storage=sync``: the run-dir push and the SFTP pulls;
    ``code_sync=rsync``; an object-store run dir: each task's log, copied here over SFTP
    and uploaded when it ends) cannot go through gcloud, which carries a command, not
    rsync or SFTP. gcloud only wraps OpenSSH, though: at launch each worker's ssh is
    asked of it once (``--dry-run``) and the copies use that (``_derive_ssh``), host keys
    checked in gcloud's known_hosts under the worker's alias ``tpu.NODE_ID-WORKER``. Not
    with ``tunnel_through_iap`` (no address to reach). ``cluster.multihost.workdir`` may
    hold ``{name}`` and ``{worker}`` (workers sharing a file system each get their own),
    and ``cluster.tpu_vm.slots`` runs several tasks on a worker."""

    name = "tpu_vm"

    def __init__(self, cfg, *, echo: bool = True) -> None:
        super().__init__(cfg, echo=echo)
        self.tpu = cfg.cluster.tpu_vm
        self.clear_accelerator = bool(self.tpu.clear_accelerator_holders)
        # storage=sync, code_sync=rsync and an object-store run dir (its task logs) copy
        # files with rsync and SFTP over the ssh that gcloud would run for each worker
        # (asked with --dry-run: _derive_ssh).
        self._copies = self.storage == "sync" or self.code_sync == "rsync" or self.object_root
        if self.tpu.tunnel_through_iap and self.tpu.internal_ip:
            raise ConfigError(
                "cluster.tpu_vm.internal_ip=true and tunnel_through_iap=true exclude each "
                "other (gcloud refuses both): internal_ip when this machine reaches the "
                "workers' VPC addresses, tunnel_through_iap (gcloud alpha's IAP tunnel) when "
                "it does not"
            )
        if self._copies and self.tpu.tunnel_through_iap:
            if self.storage == "sync":
                what = "cluster.multihost.storage=sync"
            elif self.code_sync == "rsync":
                what = "cluster.multihost.code_sync=rsync"
            else:
                what = f"an object-store run dir (run.root={cfg.run.root})"
            raise ConfigError(self._iap_refusal(what))
        if int(self.tpu.slots) > 1 and self.clear_accelerator:
            raise ConfigError(
                f"cluster.tpu_vm.slots={self.tpu.slots} runs several tasks on a worker at once, "
                "and clearing its accelerator holders before each task "
                "(cluster.tpu_vm.clear_accelerator_holders=true) would kill a sibling task's "
                "hold on the TPU: set clear_accelerator_holders=false (several slots suit "
                "stages that run on the worker's CPUs: k-means, metrics with device=cpu)"
            )
        self._tpu_targets: dict[int, TpuTarget] = {}

    @staticmethod
    def _iap_refusal(what: str) -> str:
        return (
            f"{what} is not supported with cluster.tpu_vm.tunnel_through_iap=true: it copies "
            "files (the code, run-dir files, task logs) with rsync and SFTP straight to each "
            "worker's address (the ssh gcloud would run), and an IAP tunnel has no address "
            "to reach, only gcloud's own ProxyCommand; use a run dir every worker mounts "
            "(run.root=/shared/..., cluster.multihost.storage=shared) and code_sync=archive, "
            "or reach the workers directly (this machine in their VPC or on a VPN, with "
            "cluster.tpu_vm.internal_ip=true)"
        )

    def _refuse_object_store(self, paths: RunPaths) -> None:
        if self.tpu.tunnel_through_iap:
            raise ConfigError(self._iap_refusal(f"an object-store run dir ({paths.root})"))

    def _host_key_fix(self, w: Worker) -> str:
        name, worker = w.label.rsplit("/w", 1)
        return (
            "; gcloud checks it in ~/.ssh/google_compute_known_hosts under the alias "
            f"tpu.NODE_ID-{worker}: if the worker was recreated, check the fingerprint, "
            f"delete that line, and connect once with `gcloud compute tpus tpu-vm ssh {name} "
            f"--worker={worker} --command=true` (without --strict-host-key-checking) to "
            "record its new key"
        )

    def _names(self) -> list[str]:
        names = [str(n) for n in (self.tpu.names or [])] or (
            [str(self.tpu.name)] if self.tpu.name else []
        )
        if not names:
            raise ConfigError(
                "cluster=tpu_vm needs cluster.tpu_vm.name=NAME (or names=[A,B] for several "
                "slices), with cluster.tpu_vm.zone and project"
            )
        return names

    def describe(self, name: str) -> list[str]:
        """The worker addresses of TPU ``name`` (its networkEndpoints, in worker order)."""
        argv = gcloud_describe_argv(name, self.tpu.zone, self.tpu.project, str(self.tpu.gcloud))
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise ConfigError(f"cannot run {argv[0]!r}: install the Google Cloud CLI") from None
        if p.returncode != 0:
            raise RemoteError(
                f"TPU {name}: `{shlex.join(argv)}` failed (exit {p.returncode}): "
                f"{p.stderr.strip()[-500:]}"
            )
        try:
            node = json.loads(p.stdout)
        except json.JSONDecodeError as exc:
            raise RemoteError(f"TPU {name}: describe did not print JSON ({exc})") from None
        state = node.get("state")
        if state and state != "READY":
            raise RemoteError(f"TPU {name} is {state}, not READY; wait for it or recreate it")
        eps = node.get("networkEndpoints") or []
        return [str(e.get("ipAddress", "")) for e in eps]

    def _worker_dir(self, name: str, worker: int) -> str:
        """``cluster.multihost.workdir`` for worker ``worker`` of TPU ``name``: its
        ``{name}`` and ``{worker}`` replaced (workers that share a file system, an NFS home,
        each get their own: ``storage=sync`` needs each worker's run dir its own)."""
        return self.workdir.replace("{name}", name).replace("{worker}", str(worker))

    def make_workers(self) -> list[Worker]:
        out = []
        for name in self._names():
            if self.tpu.workers:
                addrs = [""] * int(self.tpu.workers)
            else:
                addrs = self.describe(name)
            if not addrs:
                raise RemoteError(f"TPU {name} has no workers (networkEndpoints is empty)")
            for i, addr in enumerate(addrs):
                t = TpuTarget(
                    name=name,
                    worker=i,
                    zone=self.tpu.zone,
                    project=self.tpu.project,
                    user=self.tpu.user,
                    ssh_key_file=os.path.expanduser(str(self.tpu.ssh_key_file))
                    if self.tpu.ssh_key_file
                    else None,
                    internal_ip=bool(self.tpu.internal_ip),
                    tunnel_through_iap=bool(self.tpu.tunnel_through_iap),
                    gcloud=str(self.tpu.gcloud),
                    connect_timeout_s=int(self.mh.connect_timeout_s),
                    ssh_flags=tuple(str(f) for f in self.tpu.ssh_flags),
                )
                self._tpu_targets[len(out)] = t
                out.append(
                    Worker(
                        len(out),
                        f"{name}/w{i}",
                        addr or f"{name}-w{i}",
                        int(self.tpu.slots),
                        {},
                        lambda cmd, stdin=False, t=t: gcloud_ssh_argv(t, cmd),
                        workdir=self._worker_dir(name, i),
                        home=self._worker_dir(name, i),
                    )
                )
        return out

    # -- storage=sync, code_sync=rsync, object-store logs: the ssh gcloud would run ------

    def _derive_ssh(self, ws: list[Worker]) -> None:
        """For each of ``ws`` (all at once): the ``ssh`` that gcloud would run for it
        (``gcloud ... tpu-vm ssh --worker=i --dry-run``, which reads the node and connects
        to nothing), read with ``parse_gcloud_ssh``; the code rsync, the run-dir push, the
        SFTP pulls and an object-store run dir's SFTP log copies use it (its address, key,
        and gcloud's known_hosts with the worker's host-key alias, checked strictly).
        Raises ``RemoteError`` naming the worker when gcloud fails or prints no usable ssh
        command."""
        todo = [w for w in ws if w.push is None and w.rsync is None]

        def ask(w: Worker) -> tuple[int, str, str]:
            argv = gcloud_ssh_dry_run_argv(self._tpu_targets[w.index])
            try:
                p = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=float(self.mh.command_timeout_s),
                )
            except FileNotFoundError:
                raise ConfigError(f"cannot run {argv[0]!r}: install the Google Cloud CLI") from None
            except subprocess.TimeoutExpired:
                return SSH_FAILED, "", f"no answer within {self.mh.command_timeout_s} s"
            return p.returncode, p.stdout, p.stderr

        for w, (rc, out, err) in zip(todo, self._pool(ask, todo), strict=True):
            argv = shlex.join(gcloud_ssh_dry_run_argv(self._tpu_targets[w.index]))
            if rc != 0:
                raise RemoteError(
                    f"host {w.label}: `{argv}` failed (exit {rc}): {err.strip()[-500:]}"
                )
            try:
                target = parse_gcloud_ssh(out, int(self.mh.connect_timeout_s))
            except ValueError as exc:
                raise RemoteError(
                    f"host {w.label}: cluster.multihost.storage=sync, code_sync=rsync and an "
                    "object-store run dir (its task logs) copy files over the ssh that "
                    f"`{argv}` prints, and it cannot be used: {exc}"
                ) from None
            w.rsync = lambda src, dest, t=target: rsync_argv(t, src, dest)
            key = target.key_file
            self._copy_over(
                w,
                target,
                lambda t=target, key=key: Login(
                    t.user or getpass.getuser(),
                    f"key file {key}" if key else "ssh-agent",
                    key_file=key,
                    agent=True,
                ),
            )

    def preflight(self) -> list[Worker]:
        alive = super().preflight()
        if self._copies:
            self._derive_ssh(alive)
        return alive

    def _dry_run(self, paths: RunPaths, plan: Plan) -> None:
        if self._copies:
            self._say(
                "# the rsync and SFTP copies go over the ssh gcloud would run for each "
                "worker, as `gcloud compute tpus tpu-vm ssh ... --dry-run` prints it:"
            )
            self._derive_ssh(self.workers())
        super()._dry_run(paths, plan)
