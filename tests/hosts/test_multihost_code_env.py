"""code_sync=rsync and cluster.pass_env of the hosts launcher, on the real namespace sshd
hosts n1 and n2 (scripts/hosts/up.sh; they share this file system, so the remote rsync is
this machine's binary), with trivial jobs (tests/unit/launchers/echo_job.py,
tests/hosts/secret_job.py).

- rsync: the working tree's tracked files reach the remote workdir over the launcher's
  own ssh (host key checked, its key and known_hosts), the tasks run from there, and the
  commit is in the attempt records.
- pass_env: a hostile secret value reaches the tasks through the start command's stdin
  and is nowhere in the run dir (scheduler log included), the launch output, or any
  process's argv on the host while the task runs; a name not set is an error at launch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cli.run import save_run_config
from launchers.hosts.launcher import HostsLauncher, TpuVmLauncher
from lib.config.compose import compose
from lib.config.schema import EmbedfleetConfig
from lib.core.errors import ConfigError
from lib.core.paths import RunPaths
from lib.plan.spec import ARRAY, Plan, StageSpec
from tests.conftest import REPO, run_launch

ECHO_JOB = "tests.unit.launchers.echo_job"
SECRET_JOB = "tests.hosts.secret_job"
HOSTS = ("n1", "n2")
SECRET_VAR = "EF_TEST_SECRET_TOKEN"
# Shell-hostile, several lines, long enough to search for.
SECRET = "s3cr3t-9f1c 'q' \"dq\" $(touch PWNED) `id`\nsecond-line-7a2b *"


@pytest.fixture(scope="module")
def ns(ssh_hosts):
    return ssh_hosts.need_ns(HOSTS)


def _cfg(ssh_hosts, **multihost):
    return ssh_hosts.hosts_config([{"name": h} for h in HOSTS], **multihost)


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout


def test_code_sync_rsync_copies_the_tracked_files_and_the_tasks_run_there(ns, tmp_path, capsys):
    code = tmp_path / "code dir"
    cfg = _cfg(ns, code_sync="rsync", workdir=str(code))
    spec = StageSpec("a", "embed", ECHO_JOB, "a", ARRAY, 2, "h")
    run = tmp_path / "run"
    result = HostsLauncher(cfg, echo=False).launch(RunPaths(str(run)), Plan([spec], 0))
    out = capsys.readouterr().out
    assert result.complete, out
    head = _git("rev-parse", "HEAD").strip()
    assert f"(commit {head[:12]}" in out and f"rsynced to {code} on the hosts" in out
    tracked = [n for n in _git("ls-files", "-z").split("\0") if n and (REPO / n).exists()]
    copied = {str(p.relative_to(code)) for p in code.rglob("*") if p.is_file()}
    assert set(tracked) <= copied, sorted(set(tracked) - copied)[:5]
    assert (code / ECHO_JOB.replace(".", "/")).with_suffix(".py").read_bytes() == (
        REPO / "tests/unit/launchers/echo_job.py"
    ).read_bytes()
    assert not (code / ".venv").exists() and not (code / ".git").exists()  # tracked files only
    rec = json.loads((run / "a" / "attempts" / "task_00000.json").read_text())
    assert rec["code"]["sync"] == "rsync" and rec["code"]["commit"] == head
    assert rec["code"]["dir"] == str(code) and isinstance(rec["code"]["dirty"], bool)
    # the tasks imported lib/ from the copy (cwd and PYTHONPATH there), not this checkout
    assert list((code / "lib" / "core" / "__pycache__").glob("markers.*.pyc"))


def test_code_sync_rsync_on_tpu_vm_is_refused_only_through_an_iap_tunnel(tmp_path):
    """code_sync=rsync on tpu_vm runs over the ssh gcloud would run for each worker
    (tests/hosts/test_gcloud_cli.py runs it); an IAP tunnel has no address for it."""

    def cfg(**tpu):
        return OmegaConf.merge(
            OmegaConf.structured(EmbedfleetConfig),
            {
                "cluster": {
                    "launcher": "tpu_vm",
                    "tpu_vm": {"name": "t", "workers": 1, **tpu},
                    "multihost": {"code_sync": "rsync", "workdir": str(tmp_path)},
                }
            },
        )

    TpuVmLauncher(cfg(), echo=False)  # accepted
    with pytest.raises(ConfigError, match=r"code_sync=rsync is not supported.*code_sync=archive"):
        TpuVmLauncher(cfg(tunnel_through_iap=True), echo=False)


def _make_run(ns, run: Path, *overrides: str) -> None:
    cfg = compose(
        [
            "+experiment=quickstart",
            *ns.hosts_overrides(HOSTS),
            *overrides,
        ]
    )
    cfg.run.root, cfg.run.name, cfg.run.dir = str(run.parent), run.name, str(run)
    run.mkdir(parents=True)
    save_run_config(run, cfg)
    Plan([StageSpec("a", "embed", SECRET_JOB, "a", ARRAY, 2, "h")], 0).save(run)


def _files_with(root: Path, needles: list[bytes]) -> list[str]:
    return [
        str(p) for p in root.rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles)
    ]


def test_pass_env_secret_reaches_the_tasks_and_is_written_nowhere(ns, tmp_path):
    run = tmp_path / "run"
    _make_run(ns, run, f"cluster.pass_env=[{SECRET_VAR}]")
    env = {SECRET_VAR: SECRET}
    launched = run_launch("retry", str(run), env=env)
    waited = run_launch("wait", str(run), "--interval", "0.5", "--timeout", "300", env=env)
    text = launched.stdout + launched.stderr + waited.stdout + waited.stderr
    assert launched.returncode == 0 and waited.returncode == 0, text[-4000:]
    assert "all stages complete" in waited.stdout, text[-4000:]
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    for t in (0, 1):
        rec = json.loads((run / "a" / "out" / f"{t}.json").read_text())
        assert rec["sha256"] == digest  # the exact value, newline and quotes included
        assert rec["saw_task_shell"] and rec["in_ps"] is False  # no argv on the host holds it
    needles = [part.encode() for part in SECRET.splitlines()]
    assert (run / "scheduler.log").exists()
    assert _files_with(run, needles) == []  # logs, attempt records, run.yaml, scheduler.log
    assert not any(n.decode() in text for n in needles)
    assert not list(tmp_path.rglob("PWNED")) and not list(REPO.glob("PWNED"))


def test_pass_env_name_not_set_is_an_error_at_launch(ns, tmp_path):
    run = tmp_path / "run"
    _make_run(ns, run, "cluster.pass_env=[EF_TEST_UNSET_TOKEN_31]")
    assert "EF_TEST_UNSET_TOKEN_31" not in os.environ
    proc = run_launch("retry", str(run))
    assert proc.returncode != 0
    assert "cluster.pass_env: EF_TEST_UNSET_TOKEN_31 is not set" in proc.stdout + proc.stderr
    assert not (run / "scheduler.json").exists()  # nothing was started


def test_dry_run_shows_the_rsync_and_the_secret_names_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(SECRET_VAR, SECRET)
    cfg = OmegaConf.merge(
        OmegaConf.structured(EmbedfleetConfig),
        {
            "cluster": {
                "launcher": "hosts",
                "pass_env": [SECRET_VAR],
                "hosts": [{"address": "10.0.0.9", "name": "x"}],
                "multihost": {"code_sync": "rsync", "workdir": "/srv/code"},
            }
        },
    )
    spec = StageSpec("a", "embed", ECHO_JOB, "a", ARRAY, 1, "h")
    HostsLauncher(cfg).launch(RunPaths(str(tmp_path)), Plan([spec], 0), dry_run=True)
    out = capsys.readouterr().out
    assert "ls-files -z | rsync --archive" in out and "StrictHostKeyChecking=yes" in out
    assert f"{SECRET_VAR}=<value of ${SECRET_VAR}>" in out
    assert "| ssh -T -p 22" in out and 'eval "$(cat)"' in out
    assert not any(part in out for part in SECRET.splitlines())
