"""The hosts launcher's scheduling on real namespace sshd hosts, with a trivial job
(tests/unit/launchers/echo_job.py: no model): distributed ranks across hosts with one
rendezvous, a failed task retried on another host, fail_fast, the dry run."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from launchers.hosts.launcher import HostsLauncher
from lib.core.paths import RunPaths
from lib.plan.spec import ARRAY, DISTRIBUTED, Plan, StageSpec
from tests.conftest import REPO

JOB = "tests.unit.launchers.echo_job"
GLOO_JOB = "tests.hosts.gloo_job"


def _cfg(ssh_hosts, hosts: list[dict], **multihost):
    return ssh_hosts.hosts_config(hosts, **multihost)


def _records(run, stage: str) -> dict[tuple[int, int], dict]:
    out = {}
    for p in (run / stage / "out").glob("*.json"):
        rec = json.loads(p.read_text())
        out[(rec["task"], rec["rank"])] = rec
    return out


def _attempt(run, stage: str, task: int) -> dict:
    return json.loads((run / stage / "attempts" / f"task_{task:05d}.json").read_text())


@pytest.fixture(scope="module")
def ns(ssh_hosts):
    return ssh_hosts.need_ns({"n1", "n2", "n3"})


def test_distributed_ranks_one_per_slot_with_one_rendezvous(ns, tmp_path, capsys):
    cfg = _cfg(ns, [{"name": "n1", "slots": 2}, {"name": "n2"}])
    spec = StageSpec("d", "kmeans", JOB, "d", DISTRIBUTED, 1, "h", world_size=3)
    result = HostsLauncher(cfg, echo=False).launch(RunPaths(str(tmp_path)), Plan([spec], 0))
    assert result.complete, capsys.readouterr().out
    rec = _records(tmp_path, "d")
    assert {r: rec[(0, r)]["EMBEDFLEET_HOST"] for r in range(3)} == {0: "n1", 1: "n1", 2: "n2"}
    assert {rec[(0, r)]["MASTER_ADDR"] for r in range(3)} == {ns.env["EF_HOST_n1"]}
    ports = {rec[(0, r)]["MASTER_PORT"] for r in range(3)}
    assert ports == {str(_attempt(tmp_path, "d", 0)["master_port"])}
    assert {rec[(0, r)]["WORLD_SIZE"] for r in range(3)} == {"3"}
    assert all(rec[(0, r)]["EMBEDFLEET_LAUNCHER"] == "hosts" for r in range(3))


def test_gloo_rendezvous_across_namespace_hosts(ns, tmp_path, capsys):
    """A real torch.distributed all_reduce over 3 ranks on n1 x2 and n2: gloo binds to the
    interface that holds/routes to MASTER_ADDR (the host name resolves to loopback)."""
    cfg = _cfg(ns, [{"name": "n1", "slots": 2}, {"name": "n2"}])
    spec = StageSpec("g", "kmeans", GLOO_JOB, "g", DISTRIBUTED, 1, "h", world_size=3)
    result = HostsLauncher(cfg, echo=False).launch(RunPaths(str(tmp_path)), Plan([spec], 0))
    assert result.complete, capsys.readouterr().out
    recs = [json.loads((tmp_path / "g" / "out" / f"{r}.json").read_text()) for r in range(3)]
    assert [r["sum"] for r in recs] == [6.0, 6.0, 6.0]
    assert [r["host"] for r in recs] == ["n1", "n1", "n2"]
    assert recs[2]["ifname"] == "eth0"


def test_failed_task_runs_again_on_another_host(ns, tmp_path, capsys):
    """Task 0 fails on n1 only (its per-host env): it runs again on n2 and the stage
    completes; n1 stays in the pool (a task's own exit is not a host failure)."""
    cfg = _cfg(ns, [{"name": "n1", "env": {"ECHO_FAIL_TASK": "0"}}, {"name": "n2"}])
    spec = StageSpec("a", "embed", JOB, "a", ARRAY, 3, "h")
    launcher = HostsLauncher(cfg, echo=False)
    result = launcher.launch(RunPaths(str(tmp_path)), Plan([spec], 0))
    out = capsys.readouterr().out
    assert result.complete, out
    assert "[a 0] failed on n1 (exit code 3 on n1); retry 1 of 2 on another host" in out
    rec = _attempt(tmp_path, "a", 0)
    assert rec["attempt"] == 2 and rec["host"] == "n2" and rec["returncode"] == 0
    assert not any(w.dropped for w in launcher.workers())
    assert "failing on purpose" in (tmp_path / "a" / "logs" / "task_00000.log").read_text()


def test_a_probe_that_fails_once_is_asked_again_before_the_host_counts_as_down(
    ns, tmp_path, capsys
):
    """n1's master connection in the preflight and its first probe fail as a loaded
    machine's can (ssh's 255: here a real ssh to a closed port stands in for a connection
    that timed out once); the launcher asks again each time (the preflight with one plain
    ssh: the master did not open), n1 answers, stays in the pool, and its task is not
    failed and run a second time elsewhere."""
    cfg = _cfg(ns, [{"name": "n1", "env": {"ECHO_SLEEP": "2"}}, {"name": "n2"}])
    spec = StageSpec("a", "embed", JOB, "a", ARRAY, 2, "h")
    launcher = HostsLauncher(cfg, echo=False)
    refused = ["ssh", "-p", "1", "-o", "BatchMode=yes", ns.address("n1"), "true"]
    n1 = next(w for w in launcher.workers() if w.label == "n1")
    assert n1.master
    n1.master = refused
    real = launcher._run
    calls = []

    def run(w, command, *args, **kwargs):
        if w.label == "n1" and (command == "echo ok" or "kill -0" in command):
            calls.append("preflight again" if command == "echo ok" else "probe")
            if calls.count("probe") == 1 and calls[-1] == "probe":
                p = subprocess.run(refused, capture_output=True, text=True, timeout=30)
                return p.returncode, p.stdout, p.stderr
        return real(w, command, *args, **kwargs)

    launcher._run = run
    result = launcher.launch(RunPaths(str(tmp_path)), Plan([spec], 0))
    out = capsys.readouterr().out
    assert result.complete, out
    assert calls[:3] == ["preflight again", "probe", "probe"], calls
    assert "does not answer" not in out, out
    assert all(_attempt(tmp_path, "a", t)["attempt"] == 1 for t in range(2)), out
    assert not any(w.dropped or w.failures for w in launcher.workers())


def test_attach_streams_each_tasks_log_prefixed_with_host_and_task(ns, tmp_path, capsys):
    cfg = _cfg(ns, [{"name": "n1"}, {"name": "n2"}], attach=True)
    spec = StageSpec("a", "embed", JOB, "a", ARRAY, 2, "h")
    result = HostsLauncher(cfg).launch(RunPaths(str(tmp_path)), Plan([spec], 0))
    out = capsys.readouterr().out
    assert result.complete, out
    for t in (0, 1):
        host = _attempt(tmp_path, "a", t)["host"]
        assert f"[{host} a {t}] hello from task {t} rank 0" in out, out


def test_fail_fast_stops_at_the_first_failure(ns, tmp_path, capsys):
    cfg = _cfg(
        ns,
        [{"name": "n1", "env": {"ECHO_FAIL_TASK": "0"}}, {"name": "n2"}],
        fail_fast=True,
    )
    spec = StageSpec("a", "embed", JOB, "a", ARRAY, 2, "h")
    result = HostsLauncher(cfg, echo=False).launch(RunPaths(str(tmp_path)), Plan([spec], 0))
    out = capsys.readouterr().out
    assert not result.complete and 0 in result.failed["a"]
    assert "fail_fast: stopping" in out and "retry" not in out


def test_code_sync_archive_runs_the_tasks_from_the_unpacked_commit(ns, tmp_path, capsys):
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    code = tmp_path / "code"
    cfg = _cfg(ns, [{"name": "n1"}, {"name": "n2"}], code_sync="archive", workdir=str(code))
    spec = StageSpec("a", "embed", JOB, "a", ARRAY, 2, "h")
    run = tmp_path / "run"
    result = HostsLauncher(cfg, echo=False).launch(RunPaths(str(run)), Plan([spec], 0))
    out = capsys.readouterr().out
    assert result.complete, out
    assert f"code: commit {head[:12]} unpacked as {code}/{head}" in out
    assert (code / head / ".embedfleet-complete").exists()
    assert (code / head / "tests/unit/launchers/echo_job.py").exists()
    assert [p.name for p in code.iterdir()] == [head]  # the other host's copy was dropped
    rec = _attempt(run, "a", 0)
    assert rec["code"] == {"sync": "archive", "commit": head, "dir": f"{code}/{head}"}
    # the tasks imported lib/ from the unpacked tree (cwd and PYTHONPATH there), not this one
    assert list((code / head / "lib" / "core" / "__pycache__").glob("markers.*.pyc"))


HOLD_LAUNCH = """
import json, sys
from omegaconf import OmegaConf
from launchers.hosts.launcher import HostsLauncher
from lib.core.paths import RunPaths
from lib.plan.spec import Plan, StageSpec
cfg = OmegaConf.create(json.loads(sys.argv[2]))
spec = StageSpec("a", "embed", sys.argv[3], "a", "array", 2, "h")
HostsLauncher(cfg).launch(RunPaths(sys.argv[1]), Plan([spec], 0))
"""


def test_relaunch_adopts_tasks_still_running(ns, tmp_path, capsys):
    """A launcher killed with -9 leaves its tasks running; the next launch follows them
    (same attempt, no second copy) and completes when they end."""
    cfg = _cfg(ns, [{"name": "n1"}, {"name": "n2"}], setup=["sleep 4"])
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD_LAUNCH, str(run), json.dumps(OmegaConf.to_container(cfg)), JOB],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pids = [run / "a" / "attempts" / f"task_{t:05d}.rank0.a1.pid" for t in (0, 1)]
    deadline = time.time() + 60
    while not all(p.exists() for p in pids):
        assert time.time() < deadline and first.poll() is None, (
            "the first launcher did not start both"
        )
        time.sleep(0.05)
    first.kill()
    first.wait()
    spec = StageSpec("a", "embed", JOB, "a", ARRAY, 2, "h")
    result = HostsLauncher(cfg, echo=False).launch(RunPaths(str(run)), Plan([spec], 0))
    out = capsys.readouterr().out
    assert result.complete, out
    for t in (0, 1):
        assert f"[a {t}] adopting attempt 1 on" in out, out
        rec = _attempt(run, "a", t)
        assert rec["attempt"] == 1 and rec["returncode"] == 0
    assert len(list((run / "a" / "out").glob("*.json"))) == 2  # each task ran once


def test_dry_run_prints_every_ssh_command(ns, tmp_path, capsys):
    cfg = _cfg(ns, [{"name": "n1"}, {"name": "n2"}])
    spec = StageSpec("a", "embed", JOB, "a", ARRAY, 3, "h")
    HostsLauncher(cfg, echo=False).launch(RunPaths(str(tmp_path)), Plan([spec], 0), dry_run=True)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("$ ssh ")]
    assert len(lines) == 3
    assert all("StrictHostKeyChecking=yes" in ln and "setsid nohup sh -c" in ln for ln in lines)
    assert not (tmp_path / "a").exists()  # nothing ran
