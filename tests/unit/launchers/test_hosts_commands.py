"""The multi-host launchers' pure command builders: golden files (ssh and gcloud argv, the
remote start/probe/kill commands) and hostile values read back by a real POSIX shell."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    task_script,
    unpack_command,
)
from tests.unit.launchers.test_slurm_render import check_golden

# Shell-hostile values: spaces, both quotes, command substitution, backticks, newlines,
# a glob and a variable.
HOSTILE = "a b'c\"d $(touch PWNED) `touch PWNED2` $HOME\nline2 *"


def _task(tmp, argv, env=None, setup=(), **kw) -> RemoteTask:
    return RemoteTask(
        argv=tuple(argv),
        workdir=str(tmp),
        log_file=f"{tmp}/logs dir/task 0.log",
        pid_file=f"{tmp}/att $(x)/t.pid",
        exit_file=f"{tmp}/att $(x)/t.exit",
        env=env or {},
        setup=tuple(setup),
        **kw,
    )


def _golden_task() -> RemoteTask:
    return RemoteTask(
        argv=("/opt/py", "-m", "jobs.embed", "--run-dir", f"/runs/{HOSTILE}", "--stage", "embed"),
        workdir="/srv/code dir",
        log_file="/runs/r/embed/logs/task_00003.log",
        pid_file="/runs/r/embed/attempts/task_00003.rank0.a2.pid",
        exit_file="/runs/r/embed/attempts/task_00003.rank0.a2.exit",
        env={"EMBEDFLEET_TASK_INDEX": "3", "CUDA_VISIBLE_DEVICES": "0", "NOTE": HOSTILE},
        setup=(". /srv/venv/bin/activate", "module load cuda || true"),
        env_file="/home/u/secrets env.sh",
    )


def test_remote_commands_golden():
    t = _golden_task()
    text = "\n".join(
        [
            "# task_script",
            task_script(t),
            "# start_command",
            start_command([t]),
            "# probe_command",
            probe_command([("t3r0", t.pid_file, t.exit_file)]),
            "# kill_command",
            kill_command([t.pid_file, "/runs/x y/p"]),
            "# unpack_command",
            unpack_command("/srv/code dir", "0123456789abcdef0123456789abcdef01234567"),
            "# start_command with secrets on stdin",
            start_command([t], stdin_env=["HF_TOKEN", "WANDB_API_KEY"]),
            "# env_stdin",
            env_stdin({"HF_TOKEN": HOSTILE, "WANDB_API_KEY": "k"}).decode(),
            "# clear_accelerator",
            task_script(RemoteTask(("python",), "/w", "/l", "/p", "/e", clear_accelerator=True)),
        ]
    )
    check_golden("hosts_remote.txt", text + "\n")


def test_local_argv_golden():
    ssh = SshTarget("10.0.0.2", 2222, "me", "/k/id key", False, "/kh/known hosts", 5)
    tpu = TpuTarget(
        "v4-32", 3, "us-central2-b", "proj", "me", "/k/id", True, False, ssh_flags=("-p 2222",)
    )
    iap = TpuTarget("v4-32", 1, "us-central2-b", "proj", tunnel_through_iap=True)
    lines = [
        shlex.join(ssh_argv(ssh, "echo " + shlex.quote(HOSTILE))),
        shlex.join(ssh_argv(SshTarget("h", agent=True), "true")),
        shlex.join(ssh_argv(SshTarget("h", control_path="/tmp/efssh-x/0"), "true")),
        shlex.join(ssh_master_argv(SshTarget("h", 2222, "u", control_path="/tmp/efssh-x/0"))),
        shlex.join(gcloud_ssh_argv(tpu, "echo " + shlex.quote(HOSTILE))),
        shlex.join(gcloud_ssh_argv(TpuTarget("t", 0), "true")),
        shlex.join(gcloud_ssh_argv(iap, "true")),  # gcloud alpha: IAP for TPU VMs
        shlex.join(gcloud_describe_argv("v4-32", "us-central2-b", "proj")),
        shlex.join(rsync_argv(ssh, "/src/my checkout", f"/srv/code {HOSTILE}")),
        shlex.join(rsync_argv(SshTarget("h", control_path="/tmp/efssh-x/0"), "/s/", "/w")),
    ]
    check_golden("hosts_argv.txt", "\n".join(lines) + "\n")


def test_ssh_argv_checks_host_keys_and_ends_with_the_command():
    argv = ssh_argv(SshTarget("h", known_hosts="/kh"), "the command")
    assert "StrictHostKeyChecking=yes" in argv and "UserKnownHostsFile=/kh" in argv
    assert "StrictHostKeyChecking=no" not in argv and "accept-new" not in " ".join(argv)
    assert argv[-3:] == ["--", "h", "the command"]


def test_gcloud_argv_is_one_worker_never_all():
    argv = gcloud_ssh_argv(TpuTarget("t", 5), "cmd")
    assert "--worker=5" in argv and "--worker=all" not in argv
    assert argv[-1] == "--command=cmd"


def test_bad_env_name_refused(tmp_path):
    with pytest.raises(ValueError, match="not a shell name"):
        task_script(_task(tmp_path, ["true"], env={"A;rm -rf /": "x"}))
    with pytest.raises(ValueError, match="not a hex object name"):
        unpack_command("/w", "HEAD; rm -rf /")
    with pytest.raises(ValueError, match="plain token"):
        probe_command([("t 1; reboot", "/p", "/e")])


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _sh(command: str, cwd) -> subprocess.CompletedProcess:
    # What the host's login shell does with the remote command ssh hands it.
    return subprocess.run(
        ["sh", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_hostile_values_reach_the_task_as_intended(tmp_path):
    """Started through the real ``sh`` as ssh would: the job sees exactly its argv and
    env, nothing is executed from a value, and the pid/exit files and log appear."""
    out = tmp_path / f"out {HOSTILE[:5]}.json"
    code = (
        "import json, os, sys; json.dump({'argv': sys.argv[1:], 'note': os.environ['NOTE'], "
        "'setup': os.environ.get('FROM_SETUP')}, open(sys.argv[1], 'w'))"
    )
    argv = [sys.executable, "-c", code, str(out), HOSTILE, "--x=$(id)", "", "\n"]
    setup = ['FROM_SETUP="$(echo set up)"; export FROM_SETUP']
    t = _task(tmp_path, argv, env={"NOTE": HOSTILE}, setup=setup)
    proc = _sh(start_command([t]), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "started"
    deadline = time.time() + 30
    while not os.path.exists(t.exit_file) and time.time() < deadline:
        time.sleep(0.05)
    assert _read(t.exit_file).strip() == "0", _read(t.log_file)
    got = json.loads(out.read_text())
    assert got == {
        "argv": [str(out), HOSTILE, "--x=$(id)", "", "\n"],
        "note": HOSTILE,
        "setup": "set up",
    }
    assert not list(tmp_path.glob("PWNED*")) and not list(tmp_path.parent.glob("PWNED*"))
    probe = _sh(probe_command([("t0r0", t.pid_file, t.exit_file)]), tmp_path)
    assert probe.stdout.split() == ["t0r0", "exit", "0"]


def test_probe_and_kill_a_running_task(tmp_path):
    t = _task(tmp_path, ["sleep", "60"], setup=["sleep 60 &"])
    assert _sh(start_command([t]), tmp_path).returncode == 0
    key = [("t0r0", t.pid_file, t.exit_file)]
    deadline = time.time() + 20
    while _sh(probe_command(key), tmp_path).stdout.split()[1:] != ["running"]:
        assert time.time() < deadline, "the task never showed as running"
        time.sleep(0.05)
    pgid = int(_read(t.pid_file))
    assert os.getpgid(pgid) == pgid  # its own process group (setsid)
    killed = _sh(kill_command([t.pid_file, f"{tmp_path}/missing pid"], grace_s=5), tmp_path)
    assert killed.stdout.strip() == "1"
    deadline = time.time() + 10
    while subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).stdout.strip():
        assert time.time() < deadline, "processes of the task's group are left"
        time.sleep(0.05)
    # Killed by a signal: no exit code, its process gone: "vanished".
    assert _sh(probe_command(key), tmp_path).stdout.split() == ["t0r0", "vanished"]


def test_probe_says_loading_until_the_ready_file_exists(tmp_path):
    t = _task(tmp_path, ["sleep", "60"])
    assert _sh(start_command([t]), tmp_path).returncode == 0
    ready = f"{tmp_path}/r 'q'.ready"
    key = [("t0r0", t.pid_file, t.exit_file, ready)]
    deadline = time.time() + 20
    while _sh(probe_command(key), tmp_path).stdout.split()[1:] != ["loading"]:
        assert time.time() < deadline, "the task never showed as loading"
        time.sleep(0.05)
    with open(ready, "w"):
        pass
    assert _sh(probe_command(key), tmp_path).stdout.split() == ["t0r0", "running"]
    _sh(kill_command([t.pid_file], grace_s=5), tmp_path)


def test_failing_setup_line_fails_the_task(tmp_path):
    t = _task(tmp_path, [sys.executable, "-c", "print('ran')"], setup=["false"])
    assert _sh(start_command([t]), tmp_path).returncode == 0
    deadline = time.time() + 20
    while not os.path.exists(t.exit_file) and time.time() < deadline:
        time.sleep(0.05)
    assert _read(t.exit_file).strip() == "1"
    assert "ran" not in _read(t.log_file)


def test_rsync_uses_the_same_ssh_as_ssh_argv():
    t = SshTarget("10.0.0.2", 2222, "me", "/k/id key", False, "/kh/known hosts", 5, "/tmp/c/0")
    argv = rsync_argv(t, "/src", "/dst dir")
    transport = shlex.split(argv[argv.index("-e") + 1])
    assert transport == ssh_argv(t, "x", stdin=True)[:-3]  # all but `-- DEST COMMAND`
    assert (
        "StrictHostKeyChecking=yes" in transport
        and "UserKnownHostsFile=/kh/known hosts" in transport
    )
    assert argv[-3:] == ["--", "/src/", "me@10.0.0.2:/dst dir/"]


def test_run_dir_push_uses_the_same_ssh_and_leaves_the_launchers_records_out():
    t = SshTarget("10.0.0.2", 2222, "me", "/k/id key", False, "/kh/known hosts", 5, "/tmp/c/0")
    argv = run_dir_rsync_argv(t, "/runs/my run", "/w d/runs/my run")
    transport = shlex.split(argv[argv.index("-e") + 1])
    assert transport == ssh_argv(t, "x", stdin=True)[:-3]
    excluded = {a.removeprefix("--exclude=") for a in argv if a.startswith("--exclude=")}
    assert excluded == {
        "/launcher.lock", "/scheduler.json", "/scheduler.log", "attempts/", "logs/", "*.part"
    }  # fmt: skip
    assert "--delete" not in argv and "--times" in argv
    assert argv[-3:] == ["--", "/runs/my run/", "me@10.0.0.2:/w d/runs/my run/"]


def test_secrets_on_stdin_reach_the_task_and_not_its_command_line(tmp_path):
    """Through the real ``sh`` as ssh would, stdin fed: the task sees the exact values
    (quotes, ``$()``, a newline), the command line holds none, nothing runs from them."""
    out = tmp_path / "env.json"
    code = (
        "import json, os, sys; json.dump({k: os.environ.get(k) for k in ('A_TOKEN', 'B_KEY')},"
        " open(sys.argv[1], 'w'))"
    )
    t = _task(tmp_path, [sys.executable, "-c", code, str(out)])
    command = start_command([t], stdin_env=["A_TOKEN", "B_KEY"])
    values = {"A_TOKEN": HOSTILE, "B_KEY": "plain-value-1234"}
    assert HOSTILE not in command and "plain-value-1234" not in command
    proc = subprocess.run(
        ["sh", "-c", command],
        cwd=tmp_path,
        input=env_stdin(values),
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    deadline = time.time() + 30
    while not os.path.exists(t.exit_file) and time.time() < deadline:
        time.sleep(0.05)
    assert _read(t.exit_file).strip() == "0", _read(t.log_file)
    assert json.loads(out.read_text()) == values
    assert not list(tmp_path.glob("PWNED*")) and not list(tmp_path.parent.glob("PWNED*"))
    with pytest.raises(ValueError, match="not a shell name"):
        env_stdin({"A;B": "x"})


def test_log_read_command_golden():
    command = log_read_command(
        [("t0a1r0", f"/runs/{HOSTILE}/a/logs/task_00000.log", 0, None), ("t1a2r1", "/l", 7, 4096)]
    )
    check_golden("hosts_log_read.txt", command + "\n")
    with pytest.raises(ValueError, match="plain token"):
        log_read_command([("t 1; reboot", "/l", 0, None)])


def test_log_reads_through_sh_after_a_probe(tmp_path):
    """Through the real ``sh`` as ssh would, after a probe: each log's bytes from an offset,
    at most the bound, exactly (a UTF-8 block cut in two, carriage returns, no final
    newline); a missing log says so; a hostile path is read as a path; status 0 even when
    nothing could be read; the probe's own lines are left as they were."""
    log = tmp_path / f"logs {HOSTILE[:12]}" / "task 0.log"
    log.parent.mkdir()
    data = "line 1\nbar \u2588\u2588\r50%\rdone\nno newline".encode()
    log.write_bytes(data)
    missing = f"{tmp_path}/$(touch PWNED)/none.log"
    probe = probe_command([("t0r0", f"{tmp_path}/p", f"{tmp_path}/e")])
    reads = log_read_command(
        [("a", str(log), 0, None), ("b", str(log), 5, 8), ("c", str(log), len(data), 64),
         ("d", missing, 0, 64)]
    )  # fmt: skip
    proc = _sh(f"{probe}; {reads}", tmp_path)
    assert proc.returncode == 0, proc.stderr
    rest, got = parse_log_reads(proc.stdout)
    assert rest == "t0r0 starting\n"
    assert got == {
        "a": (len(data), data),
        "b": (len(data), data[5:13]),
        "c": (len(data), b""),
        "d": None,
    }
    assert not list(tmp_path.glob("PWNED*")) and not list(tmp_path.parent.glob("PWNED*"))
    unreadable = _sh(log_read_command([("e", str(tmp_path), 0, 8)]), tmp_path)  # a dir
    assert unreadable.returncode == 0 and parse_log_reads(unreadable.stdout)[1] == {"e": None}
    assert parse_log_reads("log x 12 not-base64!\nt0r0 running\n") == ("t0r0 running\n", {})


# -- the ssh gcloud would run for a TPU worker (storage=sync, code_sync=rsync) -----------

# What the real gcloud CLI printed for `tpu-vm ssh ... --dry-run` (captured here against
# tests/hosts/fake_tpu_api.py): each command (a comment line), then its ssh argv.
DRY_RUN = Path(__file__).with_name("gcloud_ssh_dry_run.txt")


def _dry_runs() -> list[tuple[str, str]]:
    out, command = [], ""
    for line in DRY_RUN.read_text().splitlines():
        if line.startswith("# gcloud "):
            command = line[2:]
        elif line and not line.startswith("#"):
            out.append((command, line))
    return out


def test_gcloud_dry_run_argv_is_the_ssh_argv_with_dry_run():
    t = TpuTarget("v4-32", 2, "z", "p", "me", "/k/id key", ssh_flags=("-p 2222",))
    assert gcloud_ssh_dry_run_argv(t) == [*gcloud_ssh_argv(t, "x")[:-1], "--dry-run"]
    assert "--worker=2" in gcloud_ssh_dry_run_argv(t)


def test_parse_gcloud_ssh_of_the_real_clis_dry_run_golden():
    """Each captured dry run read into an SshTarget, and the ssh and run-dir rsync built
    from it: the worker's address, user and port, the key (its path has a space: gcloud
    prints it unquoted), gcloud's known_hosts and the worker's host-key alias, host keys
    strict; the user's flags kept, those the derived ssh sets itself dropped; a jump host
    refused (the SFTP pull could not follow it)."""
    lines = []
    for command, printed in _dry_runs():
        lines += [f"# {command}"]
        try:
            t = parse_gcloud_ssh(printed, connect_timeout_s=7)
        except ValueError as exc:
            lines.append(f"refused: {exc}")
            continue
        lines += [
            repr(t),
            shlex.join(ssh_argv(t, "true")),
            shlex.join(run_dir_rsync_argv(t, "/runs/my run", "/w/runs/my run")),
        ]
    check_golden("gcloud_derived_ssh.txt", "\n".join(lines) + "\n")
    (_, first), (_, flags), (_, jump) = _dry_runs()
    t = parse_gcloud_ssh(first)
    assert (t.address, t.port, t.user) == ("10.130.0.7", 22, "me")
    assert t.key_file == "/tmp/efcap/my keys/id_ed25519"
    assert t.known_hosts == "/tmp/efcap/home/.ssh/google_compute_known_hosts"
    assert t.host_key_alias == "tpu.7012345678901234567-2"
    argv = ssh_argv(t, "true")
    assert "StrictHostKeyChecking=yes" in argv and "HostKeyAlias=tpu.7012345678901234567-2" in argv
    assert "accept-new" not in shlex.join(argv) and "StrictHostKeyChecking=no" not in argv
    t = parse_gcloud_ssh(flags)
    assert (t.address, t.port) == ("10.130.0.8", 2222)
    assert t.extra_flags == ("-4", "-o", "Ciphers=aes256-ctr")
    with pytest.raises(ValueError, match=r"jump host \(-J me@bastion\)"):
        parse_gcloud_ssh(jump)


def test_parse_gcloud_ssh_refuses_an_iap_tunnel_and_garbage():
    # --tunnel-through-iap's form, as gcloud's ssh.py builds it (`-o 'ProxyCommand CMD'`,
    # printed unquoted); the launcher refuses storage=sync with IAP before asking.
    iap = (
        "/usr/bin/ssh -t -i /k -o HostKeyAlias=tpu.1-0 -o ProxyCommand /usr/bin/python3 "
        "/usr/lib/google-cloud-sdk/lib/gcloud.py compute start-iap-tunnel tpu 22 "
        "--listen-on-stdin -o ProxyUseFdpass=no me@tpu"
    )
    with pytest.raises(ValueError, match="ProxyCommand"):
        parse_gcloud_ssh(iap)
    with pytest.raises(ValueError, match="no ssh command"):
        parse_gcloud_ssh("Using ssh batch size of 1.\n")
    with pytest.raises(ValueError, match="not a number"):
        parse_gcloud_ssh("ssh -p x me@h")
    t = parse_gcloud_ssh("ssh -t -o Port=2200 -l root -o HostKeyAlias=a -o HostKeyAlias=b h")
    assert (t.address, t.port, t.user, t.host_key_alias) == ("h", 2200, "root", "a")


@pytest.mark.parametrize(
    ("launcher", "slot"),
    [("hosts", r"cluster\.hosts\[0\]"), ("tpu_vm", "worker 0 of cluster.tpu_vm")],
)
def test_live_log_of_a_task_whose_host_left_the_config_names_it(tmp_path, launcher, slot):
    """``logs`` of a task under storage=sync whose attempt ran on a host that is no longer
    the one at its index in the config: the error names the host and what replaced it,
    in the terms of the launcher (no ssh is run: the workers are only configured)."""
    from omegaconf import OmegaConf

    from launchers.base import write_attempt
    from launchers.hosts.launcher import HostsLauncher, TpuVmLauncher
    from lib.config.schema import EmbedfleetConfig
    from lib.core.errors import ConfigError
    from lib.core.paths import RunPaths
    from lib.plan.spec import ARRAY, StageSpec

    cluster = {
        "launcher": launcher,
        "multihost": {"storage": "sync", "workdir": str(tmp_path / "w")},
        **(
            {"hosts": [{"address": "10.9.9.9", "name": "now", "key_file": "/k"}]}
            if launcher == "hosts"
            else {"tpu_vm": {"name": "now", "workers": 1}}
        ),
    }
    cfg = OmegaConf.merge(OmegaConf.structured(EmbedfleetConfig), {"cluster": cluster})
    make = HostsLauncher if launcher == "hosts" else TpuVmLauncher
    spec = StageSpec("a", "embed", "j", "a", ARRAY, 1, "h")
    paths = RunPaths(str(tmp_path / "run"))
    write_attempt(paths, spec, 0, launcher=launcher, attempt=1, ended=None,
                  placements=[{"worker": 0, "host": "gone", "rank": 0}])  # fmt: skip
    with pytest.raises(ConfigError, match=rf"ran on host gone, which is no longer {slot} in "):
        make(cfg, echo=False).live_log(paths, spec, 0, 0)
