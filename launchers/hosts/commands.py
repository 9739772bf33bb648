"""Every command the multi-host launchers run, built by pure functions (golden-tested).

Two layers:

- the remote command: a POSIX ``sh`` command line run by the host's login shell:
  ``start_command`` (a task detached in its own session under ``setsid nohup``, its pid
  and exit code written to files), ``probe_command`` (the state of a host's tasks),
  ``kill_command`` (their process groups). Every value in them (paths, arguments,
  environment values) is quoted with ``shlex.quote``/``shlex.join``; the only text taken
  as shell is ``setup`` lines, which are shell by intent.
- the local argv that carries a remote command to a machine: ``ssh_argv`` (OpenSSH, host
  keys checked against a known_hosts file, never added) or ``gcloud_ssh_argv`` (``gcloud
  compute tpus tpu-vm ssh NAME --worker=i --command=...``, one process per worker, never
  ``--worker=all``); ``gcloud_describe_argv`` reads a TPU's workers.
- what carries files to a TPU worker (``storage=sync``, ``code_sync=rsync``): gcloud only
  wraps OpenSSH, and ``gcloud_ssh_dry_run_argv`` asks it for the ``ssh`` it would run for a
  worker; ``parse_gcloud_ssh`` reads that into an ``SshTarget`` (the worker's address,
  port, user, key, gcloud's known_hosts and host-key alias ``tpu.NODE_ID-WORKER``), which
  ``rsync_argv``/``run_dir_rsync_argv`` and the SFTP pulls then use like any ssh host.
"""

from __future__ import annotations

import base64
import binascii
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# What MaxText's multihost_runner clears before a TPU job: processes holding the
# accelerator, and libtpu's lock file (left by a killed run, it blocks the next one).
CLEAR_ACCELERATOR = (
    'for d in /dev/accel* /dev/vfio/*; do [ -e "$d" ] || continue; '
    'for p in $(lsof -t "$d" 2>/dev/null) $(fuser "$d" 2>/dev/null); do '
    '[ "$p" = "$$" ] || sudo -n kill -9 "$p" 2>/dev/null || kill -9 "$p" 2>/dev/null || true; '
    "done; done; "
    "sudo -n rm -f /tmp/libtpu_lockfile 2>/dev/null || rm -f /tmp/libtpu_lockfile || true"
)

# gloo binds to the address of the host name, which on many machines (and in a network
# namespace) is 127.0.x.1: its peers on other hosts then cannot reach it. Unless set, bind
# to the interface that holds MASTER_ADDR, or else the one that routes to it.
GLOO_INTERFACE = (
    'if [ -z "${GLOO_SOCKET_IFNAME:-}" ] && command -v ip >/dev/null; then '
    "d=$(ip -o -4 addr show to \"$MASTER_ADDR\" 2>/dev/null | awk '{print $2; exit}'); "
    '[ -n "$d" ] || d=$(ip route get "$MASTER_ADDR" 2>/dev/null '
    "| sed -n 's/.* dev \\([^ ]*\\).*/\\1/p' | head -n 1); "
    '[ -z "$d" ] || export GLOO_SOCKET_IFNAME="$d"; fi'
)


@dataclass(frozen=True)
class RemoteTask:
    """One process of a task on a host: what runs, where its files go."""

    argv: tuple[str, ...]  # the job command (python -m jobs.X --run-dir ... --stage ...)
    workdir: str
    log_file: str
    pid_file: str
    exit_file: str
    env: Mapping[str, str] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    env_file: str | None = None  # sourced before the task (secrets live there, not here)
    clear_accelerator: bool = False


def _check_env(env: Mapping[str, str]) -> None:
    for key in env:
        if not _ENV_NAME.match(key):
            raise ValueError(f"environment variable name {key!r} is not a shell name")


def task_script(task: RemoteTask) -> str:
    """The ``sh`` script of one task process: records its pid (= its process group, as a
    session leader), exports the task's variables, clears stale accelerator holders if
    asked, sources the env file, runs the setup lines and the job (``set -e``: a failing
    setup line fails the task), and writes the exit code atomically as it ends."""
    _check_env(task.env)
    q = shlex.quote
    lines = [
        f"echo $$ > {q(task.pid_file + '.tmp')} && mv -f {q(task.pid_file + '.tmp')} "
        f"{q(task.pid_file)}",
        "trap "
        + q(
            f"c=$?; echo $c > {q(task.exit_file + '.tmp')}; "
            f"mv -f {q(task.exit_file + '.tmp')} {q(task.exit_file)}"
        )
        + " EXIT",
        "set -e",
        f"cd {q(task.workdir)}",
    ]
    for key in sorted(task.env):  # first: setup lines may use them (CUDA_VISIBLE_DEVICES)
        lines.append(f"export {key}={q(task.env[key])}")
    if "MASTER_ADDR" in task.env:
        lines.append(GLOO_INTERFACE)
    if task.clear_accelerator:
        lines.append(CLEAR_ACCELERATOR)
    if task.env_file:
        lines.append(f". {q(task.env_file)}")
    lines.extend(task.setup)
    lines.append(shlex.join(task.argv))
    return "\n".join(lines) + "\n"


def start_command(tasks: Sequence[RemoteTask], stdin_env: Sequence[str] = ()) -> str:
    """The remote command that starts ``tasks`` detached (each in its own session, output
    appended to its log, stdin from /dev/null) and returns at once.

    ``stdin_env``: names of variables (secrets, ``cluster.pass_env``) whose values come on
    the command's stdin as ``NAME=VALUE`` assignments (``env_stdin``), read into the shell
    and exported before the tasks start, so that no value is on a command line (``ps``)
    or in a file; the tasks inherit them."""
    q = shlex.quote
    parts = []
    if stdin_env:
        _check_env(dict.fromkeys(stdin_env, ""))
        # eval of what env_stdin wrote: NAME=<shlex.quote(value)> lines only.
        parts.append(f'eval "$(cat)" && export {shlex.join(sorted(stdin_env))}')
    for t in tasks:
        dirs = sorted({_parent(t.log_file), _parent(t.pid_file), _parent(t.exit_file)})
        parts.append(
            f"mkdir -p {' '.join(q(d) for d in dirs)} && rm -f {q(t.pid_file)} {q(t.exit_file)}"
            f" && {{ setsid nohup sh -c {q(task_script(t))} >> {q(t.log_file)} 2>&1 "
            "< /dev/null & }"
        )
    return " && ".join(parts) + " && echo started"


def env_stdin(values: Mapping[str, str]) -> bytes:
    """The stdin of a ``start_command(..., stdin_env=names)``: one ``NAME=VALUE`` line per
    variable, the value quoted with ``shlex.quote`` (a newline in it stays inside quotes)."""
    _check_env(values)
    return "".join(f"{k}={shlex.quote(values[k])}\n" for k in sorted(values)).encode()


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def probe_command(entries: Sequence[tuple[str, ...]]) -> str:
    """For each ``(key, pid_file, exit_file[, ready_file])`` print one line ``key STATE
    [code]``: ``exit N`` (ended with code N), ``running``, ``loading`` (running, but its
    ready file, ``lib.runtime.ready``, is not there yet), ``vanished`` (its process is gone
    without an exit code: killed with -9, the host rebooted) or ``starting`` (no pid file
    yet)."""
    q = shlex.quote
    parts = []
    for key, pid_file, exit_file, *ready in entries:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]+", key):
            raise ValueError(f"probe key {key!r} must be a plain token")
        alive = f"echo {key} running"
        if ready:
            alive = f"if [ -e {q(ready[0])} ]; then {alive}; else echo {key} loading; fi"
        parts.append(
            f"if [ -s {q(exit_file)} ]; then echo {key} exit $(cat {q(exit_file)}); "
            f"elif [ -s {q(pid_file)} ]; then p=$(cat {q(pid_file)}); "
            f'if kill -0 "$p" 2>/dev/null && ! grep -qs "^[0-9]* ([^)]*) Z" "/proc/$p/stat"; '
            f"then {alive}; else echo {key} vanished; fi; "
            f"else echo {key} starting; fi"
        )
    return "; ".join(parts) if parts else "true"


# ``log_read_command``'s answer: one line per log, ``log KEY SIZE DATA`` (SIZE: the file's
# size in bytes; DATA: base64 of the bytes read, "" for none) or ``log KEY -`` (no file).
LOG_READ_PREFIX = "log"


def log_read_command(entries: Sequence[tuple[str, str, int, int | None]]) -> str:
    """For each ``(key, log_file, offset, max_bytes)``: one line ``log KEY SIZE DATA``, DATA
    the base64 of at most ``max_bytes`` bytes (None: all) of ``log_file`` from byte
    ``offset`` on (``tail -c +OFFSET+1 | head -c MAX``, streamed, not held in the shell),
    or ``log KEY -`` when there is no such file. Base64 keeps the answer plain lines
    however the log's bytes look (a line cut short, a progress bar's carriage returns), so
    it can follow ``probe_command``'s on the same ssh. Its exit status is 0 (appended to a
    probe, it cannot make the host look unreachable)."""
    q = shlex.quote
    parts = []
    for key, log_file, offset, max_bytes in entries:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]+", key):
            raise ValueError(f"log key {key!r} must be a plain token")
        f = q(log_file)
        head = f" | head -c {int(max_bytes)}" if max_bytes is not None else ""
        parts.append(
            f"if [ -f {f} ]; then s=$(wc -c < {f}); printf '{LOG_READ_PREFIX} %s %s ' {key} $s; "
            f"tail -c +{int(offset) + 1} {f}{head} | base64 | tr -d '\\n'; echo; "
            f"else echo {LOG_READ_PREFIX} {key} -; fi"
        )
    return "{ " + "; ".join(parts) + "; } 2>/dev/null; true" if parts else "true"


def parse_log_reads(stdout: str) -> tuple[str, dict[str, tuple[int, bytes] | None]]:
    """Split what a command ending in ``log_read_command`` printed: (the other lines, key
    -> (the log's size, the bytes read), or None where it had no such file). A ``log``
    line that does not parse (its size or data garbled) is dropped, not taken as data."""
    rest, reads = [], {}
    for line in stdout.splitlines(keepends=True):
        parts = line.split()
        if not parts or parts[0] != LOG_READ_PREFIX:
            rest.append(line)
            continue
        if len(parts) == 3 and parts[2] == "-":
            reads[parts[1]] = None
            continue
        try:
            size = int(parts[2])
            data = base64.b64decode(parts[3], validate=True) if len(parts) > 3 else b""
        except (IndexError, ValueError, binascii.Error):
            continue
        reads[parts[1]] = (size, data)
    return "".join(rest), reads


def kill_command(pid_files: Sequence[str], grace_s: int = 5) -> str:
    """SIGTERM the process group named in each pid file, wait up to ``grace_s`` for them,
    then SIGKILL what is left; print how many groups were signalled."""
    q = shlex.quote
    files = " ".join(q(f) for f in pid_files)
    return (
        f'n=0; for f in {files}; do [ -s "$f" ] || continue; p=$(cat "$f"); '
        'kill -s TERM -- "-$p" 2>/dev/null && n=$((n+1)); done; '
        f"i=0; while [ $i -lt {int(grace_s) * 10} ]; do left=0; for f in {files}; do "
        '[ -s "$f" ] && kill -s 0 -- "-$(cat "$f")" 2>/dev/null && left=1; done; '
        "[ $left = 0 ] && break; sleep 0.1; i=$((i+1)); done; "
        f'for f in {files}; do [ -s "$f" ] && kill -s KILL -- "-$(cat "$f")" 2>/dev/null; done; '
        "echo $n"
    )


@dataclass(frozen=True)
class SshTarget:
    """How OpenSSH reaches one host."""

    address: str
    port: int = 22
    user: str | None = None
    key_file: str | None = None
    agent: bool = False
    known_hosts: str = "~/.ssh/known_hosts"
    connect_timeout_s: int = 10
    # A control socket (OpenSSH multiplexing): commands reuse the master connection that
    # ``ssh_master_argv`` opened instead of a new handshake each; none there: a direct one.
    control_path: str | None = None
    # The name the host's key is recorded under in known_hosts (OpenSSH's HostKeyAlias;
    # gcloud's ``tpu.NODE_ID-WORKER``); None: the address (``[address]:port`` off 22).
    host_key_alias: str | None = None
    # More ssh flags, after the options above (OpenSSH takes an option's first value, so
    # they cannot undo the host-key checking): a TPU worker's, from ``parse_gcloud_ssh``.
    extra_flags: tuple[str, ...] = ()


def _ssh_options(target: SshTarget) -> list[str]:
    argv = [
        "-p",
        str(target.port),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={target.known_hosts}",
    ]
    if target.host_key_alias:
        # the key is checked against known_hosts under the alias (strictly, as above); the
        # IP check is left at OpenSSH's default, not turned off
        argv += ["-o", f"HostKeyAlias={target.host_key_alias}"]
    argv += [
        "-o",
        f"ConnectTimeout={int(target.connect_timeout_s)}",
        "-o",
        "ServerAliveInterval=5",
        "-o",
        "ServerAliveCountMax=3",
        "-o",
        "LogLevel=ERROR",
    ]
    if target.key_file:
        argv += ["-i", target.key_file, "-o", "IdentitiesOnly=yes"]
    if not target.agent:
        argv += ["-o", "IdentityAgent=none"]
    return argv + list(target.extra_flags)


def _dest(target: SshTarget) -> str:
    return f"{target.user}@{target.address}" if target.user else target.address


def _ssh_transport(target: SshTarget, *, stdin: bool) -> list[str]:
    mux = []
    if target.control_path:
        mux = ["-o", "ControlMaster=no", "-o", f"ControlPath={target.control_path}"]
    no_stdin = [] if stdin else ["-n"]
    return ["ssh", "-T", *no_stdin, *_ssh_options(target), *mux]


def ssh_argv(target: SshTarget, remote_command: str, *, stdin: bool = False) -> list[str]:
    """``ssh`` with the host key checked (StrictHostKeyChecking=yes: an unknown or changed
    key is refused, never added), no prompts, no tty, no stdin unless ``stdin`` (a copy
    fed to the remote command), then the remote command as one argument (ssh hands it to
    the remote login shell as it is)."""
    return [*_ssh_transport(target, stdin=stdin), "--", _dest(target), remote_command]


def rsync_argv(target: SshTarget, source_dir: str, remote_dir: str) -> list[str]:
    """``rsync`` of the files listed NUL-separated on its stdin (``--files-from=- --from0``,
    paths relative to ``source_dir``) into ``remote_dir`` on ``target`` (created if
    missing), over the same ``ssh`` as ``ssh_argv`` (host key checked, the same
    known_hosts, key, port and control socket) given as ``-e`` with ``shlex.join``.
    Times and permissions are kept, so a second sync sends only what changed; the remote
    path is passed to the remote rsync as one argument (rsync >= 3.2.4 protects it)."""
    return _rsync(
        target, ["--archive", "--mkpath", "--files-from=-", "--from0"], source_dir, remote_dir
    )


def _rsync(target: SshTarget, options: list[str], source_dir: str, remote_dir: str) -> list[str]:
    """``rsync OPTIONS -e SSH -- SOURCE_DIR/ [USER@]ADDRESS:REMOTE_DIR/``, the ssh that of
    ``ssh_argv`` (``shlex.join``)."""
    ssh = shlex.join(_ssh_transport(target, stdin=True))
    return [
        "rsync",
        *options,
        "-e",
        ssh,
        "--",
        source_dir.rstrip("/") + "/",
        f"{_dest(target)}:{remote_dir.rstrip('/')}/",
    ]


# What a push of the run dir (``run_dir_rsync_argv``) leaves out: the launcher's own
# records (its lock, the scheduler's record and log), attempt records and the pid/exit
# files of tasks, task logs, and downloads in progress.
RUN_DIR_PUSH_EXCLUDES = (
    "/launcher.lock",
    "/scheduler.json",
    "/scheduler.log",
    "attempts/",
    "logs/",
    "*.part",
)


def run_dir_rsync_argv(target: SshTarget, local_dir: str, remote_dir: str) -> list[str]:
    """``rsync`` of the local run dir ``local_dir`` into ``remote_dir`` on ``target``
    (``cluster.multihost.storage=sync``), less ``RUN_DIR_PUSH_EXCLUDES``, over the same
    ``ssh`` as ``ssh_argv`` (host key checked). Times are kept, so a second push sends
    only what is missing or changed (a file pulled from a host has the same time here and
    there: ``launchers.hosts.pull``); nothing there is deleted."""
    options = ["--recursive", "--links", "--times", "--perms", "--mkpath"]
    options += [f"--exclude={e}" for e in RUN_DIR_PUSH_EXCLUDES]
    return _rsync(target, options, local_dir, remote_dir)


def unpack_command(workdir: str, commit: str) -> str:
    """Unpack the tar on stdin (``git archive`` of ``commit``) as ``workdir/commit`` once:
    into a fresh temporary directory first, renamed into place when complete, so hosts
    sharing a file system, or a copy cut short, never leave a partial tree in its place."""
    if not re.fullmatch(r"[0-9a-f]{7,64}", commit):
        raise ValueError(f"commit {commit!r} is not a hex object name")
    q = shlex.quote
    dest = f"{workdir.rstrip('/')}/{commit}"
    return (
        f"mkdir -p {q(workdir)} && if [ -e {q(dest + '/.embedfleet-complete')} ]; then "
        "cat > /dev/null; echo present; else "
        f"t=$(mktemp -d {q(workdir.rstrip('/') + '/.unpack-' + commit[:12] + '.XXXXXX')}) && "
        f'tar -xf - -C "$t" && touch "$t/.embedfleet-complete" && '
        f'{{ mv -T "$t" {q(dest)} 2>/dev/null || rm -rf "$t"; }} && echo unpacked; fi'
    )


def ssh_master_argv(target: SshTarget, persist_s: int = 60) -> list[str]:
    """Open the master connection of ``target.control_path`` and go to the background
    once logged in (``-M -N -f``); it exits ``persist_s`` after its last command."""
    assert target.control_path, "a master needs a control path"
    return [
        "ssh",
        "-M",
        "-N",
        "-f",
        *_ssh_options(target),
        "-o",
        f"ControlPath={target.control_path}",
        "-o",
        f"ControlPersist={int(persist_s)}",
        "--",
        _dest(target),
    ]


@dataclass(frozen=True)
class TpuTarget:
    """How gcloud reaches one worker of a TPU VM."""

    name: str
    worker: int
    zone: str | None = None
    project: str | None = None
    user: str | None = None
    ssh_key_file: str | None = None
    internal_ip: bool = False
    tunnel_through_iap: bool = False
    gcloud: str = "gcloud"
    connect_timeout_s: int = 10
    # More flags for the ``ssh`` gcloud runs (``--ssh-flag=F`` each; gcloud splits F on
    # whitespace, and its own host-key options come first, so these cannot undo them).
    ssh_flags: tuple[str, ...] = ()


def _gcloud_scope(t: TpuTarget) -> list[str]:
    out = []
    if t.zone:
        out.append(f"--zone={t.zone}")
    if t.project:
        out.append(f"--project={t.project}")
    return out


def gcloud_ssh_argv(target: TpuTarget, remote_command: str) -> list[str]:
    """``gcloud compute tpus tpu-vm ssh [USER@]NAME --worker=i --command=...`` for one
    worker, with the key and the connection options asked for. Host keys are checked
    (``--strict-host-key-checking=yes``: gcloud's known_hosts,
    ``~/.ssh/google_compute_known_hosts``, under the alias ``tpu.NODE_ID-WORKER``); the
    ssh never prompts (``BatchMode=yes``) and gives up connecting after
    ``connect_timeout_s`` (gcloud itself tries 10 times, 5 s apart)."""
    return [*_gcloud_ssh(target), "--quiet", f"--command={remote_command}"]


def gcloud_ssh_dry_run_argv(target: TpuTarget) -> list[str]:
    """``gcloud_ssh_argv``'s command with ``--dry-run`` instead of a command: gcloud reads
    the node and prints the ``ssh`` argv it would run for the worker (its address, port,
    user, key, known_hosts and host-key alias; ``parse_gcloud_ssh``), connecting to
    nothing."""
    return [*_gcloud_ssh(target), "--quiet", "--dry-run"]


def _gcloud_ssh(target: TpuTarget) -> list[str]:
    dest = f"{target.user}@{target.name}" if target.user else target.name
    # --tunnel-through-iap exists for TPU VMs only in gcloud's alpha track (gcloud 528:
    # `gcloud compute tpus tpu-vm ssh` refuses it as an unrecognized argument).
    track = ["alpha"] if target.tunnel_through_iap else []
    argv = [target.gcloud, *track, "compute", "tpus", "tpu-vm", "ssh", dest]
    argv.append(f"--worker={target.worker}")
    argv += _gcloud_scope(target)
    if target.ssh_key_file:
        argv.append(f"--ssh-key-file={target.ssh_key_file}")
    if target.internal_ip:
        argv.append("--internal-ip")
    if target.tunnel_through_iap:
        argv.append("--tunnel-through-iap")
    argv += [
        "--strict-host-key-checking=yes",
        "--ssh-flag=-o BatchMode=yes",
        f"--ssh-flag=-o ConnectTimeout={int(target.connect_timeout_s)}",
    ]
    argv += [f"--ssh-flag={f}" for f in target.ssh_flags]
    return argv


# ssh's flags that take a value (OpenSSH's getopt string), and what ``parse_gcloud_ssh``
# does with gcloud's: the options the derived ssh sets itself (``_ssh_options``, the same
# as gcloud's or stricter) are dropped, those that would send it elsewhere than the
# worker's address (a jump host, an IAP tunnel's ProxyCommand, a config file) refused.
_SSH_VALUE_FLAGS = frozenset("BbcDEeFIiJLlmOopQRSWw")
_SSH_OWN_OPTIONS = frozenset(
    [
        "batchmode",
        "checkhostip",
        "connecttimeout",
        "hashknownhosts",
        "hostkeyalias",
        "identitiesonly",
        "identityagent",
        "identityfile",
        "loglevel",
        "port",
        "serveralivecountmax",
        "serveraliveinterval",
        "stricthostkeychecking",
        "userknownhostsfile",
    ]
)
_SSH_ROUTES = {
    "-F": "a config file",
    "-J": "a jump host",
    "-W": "stdio forwarding",
    "hostname": "HostName",
    "proxycommand": "a ProxyCommand (--tunnel-through-iap's IAP tunnel)",
    "proxyjump": "a jump host",
}


def parse_gcloud_ssh(printed: str, connect_timeout_s: int = 10) -> SshTarget:
    """The ``SshTarget`` of the ``ssh`` command that ``gcloud_ssh_dry_run_argv`` printed
    (its last line that starts a command): the address and user of its ``[USER@]ADDRESS``,
    ``-p`` (else ``-o Port``, else 22), the first ``-i`` key, ``UserKnownHostsFile`` and
    ``HostKeyAlias`` (first value wins, as in OpenSSH), other flags kept as
    ``extra_flags``; host keys strict whatever gcloud printed. gcloud prints its argv
    joined with spaces, unquoted: a ``-i`` path is taken up to the next flag. Raises
    ``ValueError`` when there is no ssh command or it routes elsewhere than the worker's
    address (``_SSH_ROUTES``)."""
    lines = [ln.split() for ln in printed.splitlines() if ln.strip()]
    words = next((w for w in reversed(lines) if "ssh" in w[0].rsplit("/", 1)[-1]), None)
    if not words or len(words) < 2:
        raise ValueError(f"gcloud printed no ssh command: {printed.strip()[-300:]!r}")
    dest, flags = words[-1], words[1:-1]
    port = port_opt = user = key = known = alias = None
    extra: list[str] = []
    j = 0

    def more() -> bool:  # the next word is a value (not a flag)
        return j < len(flags) and not flags[j].startswith("-")

    while j < len(flags):
        tok = flags[j]
        j += 1
        if not tok.startswith("-") or tok == "--":
            raise ValueError(f"unexpected {tok!r} in gcloud's ssh command {printed.strip()!r}")
        flag, value = tok[:2], tok[2:]
        if flag[1:] not in _SSH_VALUE_FLAGS:
            if tok not in ("-t", "-T", "-n"):  # the tty and stdin are the caller's
                extra.append(tok)
            continue
        if not value:
            if j >= len(flags):
                raise ValueError(f"{tok} without a value in gcloud's ssh command")
            value = flags[j]
            j += 1
        if flag in _SSH_ROUTES:
            raise ValueError(f"gcloud's ssh goes through {_SSH_ROUTES[flag]} ({tok} {value})")
        if flag == "-i":
            while more():
                value = f"{value} {flags[j]}"
                j += 1
            key = key or value
        elif flag == "-p":
            port = value  # the last -p wins, as in OpenSSH
        elif flag == "-l":
            user = user or value
        elif flag == "-o":
            name, eq, val = value.partition("=")
            if not eq and more():  # "-o Key Value"
                val = flags[j]
                j += 1
            low = name.lower()
            if low in _SSH_ROUTES:
                raise ValueError(f"gcloud's ssh goes through {_SSH_ROUTES[low]} (-o {value})")
            if low == "hostkeyalias":
                alias = alias or val
            elif low == "userknownhostsfile":
                known = known or val
            elif low == "port":
                port_opt = port_opt or val
            elif low == "identityfile":
                key = key or val
            elif low not in _SSH_OWN_OPTIONS:
                extra += ["-o", f"{name}={val}"]
        else:
            extra += [flag, value]
    dest_user, at, address = dest.rpartition("@")
    if not address or address.startswith("-"):
        raise ValueError(f"no [USER@]ADDRESS at the end of gcloud's ssh command {printed!r}")
    try:
        number = int(port or port_opt or 22)
    except ValueError:
        raise ValueError(f"port {port or port_opt!r} of gcloud's ssh is not a number") from None
    return SshTarget(
        address=address,
        port=number,
        user=user or (dest_user if at else None),
        key_file=key,
        agent=True,  # as gcloud's ssh: a key it loaded into ssh-agent works too
        known_hosts=known or "~/.ssh/known_hosts",
        connect_timeout_s=connect_timeout_s,
        host_key_alias=alias,
        extra_flags=tuple(extra),
    )


def gcloud_describe_argv(
    name: str, zone: str | None, project: str | None, gcloud: str = "gcloud"
) -> list[str]:
    """``gcloud compute tpus tpu-vm describe NAME --format=json``: its workers are its
    ``networkEndpoints``."""
    scope = _gcloud_scope(TpuTarget(name, 0, zone, project))
    return [gcloud, "compute", "tpus", "tpu-vm", "describe", name, *scope, "--format=json"]
