"""Detached hosts runs (the default of cluster=hosts|tpu_vm from the command line) on real
namespace sshd hosts, with a trivial job (tests/unit/launchers/echo_job.py) held at a gate
file by its setup line: ``retry`` returns while the tasks run and a background scheduler
holds the run; ``status`` names it and what runs on each host; a second launch is refused
naming its pid; ``wait`` returns when every stage is complete (the scheduler gave the
third task the first free slot and ran the next stage); ``cancel`` leaves no scheduler
and no task process; after ``kill -9`` of the scheduler, ``status`` says it is gone,
``wait`` stops, and a relaunch adopts the tasks still running and finishes the run.

The run dirs are made by hand (run.yaml + a plan.json of echo-job stages) and launched
with ``launch.py retry``, which starts them as a launch does (Launcher.start with the run
lock); tests/hosts/test_multihost.py does it from ``launch.py +experiment=...``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cli.run import save_run_config
from lib.config.compose import compose
from lib.core.locks import process_alive
from lib.plan.spec import ARRAY, SINGLE, Plan, StageSpec
from tests.conftest import run_launch

JOB = "tests.unit.launchers.echo_job"
HOSTS = ("n1", "n2")


@pytest.fixture(scope="module")
def ns(ssh_hosts):
    return ssh_hosts.need_ns(HOSTS)


def _make_run(ns, run: Path, *overrides: str) -> Path:
    """A run dir of two echo-job stages, ``a`` (3 tasks) then ``b`` (1), on n1 and n2 (one
    slot each); every task waits in its setup line until the returned gate file exists."""
    gate = run.parent / f"{run.name}.gate"
    cfg = compose(
        [
            "+experiment=quickstart",
            *ns.hosts_overrides(HOSTS),
            f"cluster.multihost.setup=['while [ ! -e {gate} ]; do sleep 0.1; done']",
            *overrides,
        ]
    )
    cfg.run.root, cfg.run.name, cfg.run.dir = str(run.parent), run.name, str(run)
    run.mkdir(parents=True)
    save_run_config(run, cfg)
    stages = [
        StageSpec("a", "embed", JOB, "a", ARRAY, 3, "h"),
        StageSpec("b", "merge", JOB, "b", SINGLE, 1, "h", depends_on=("a",)),
    ]
    Plan(stages, 0).save(run)
    return gate


def _ok(proc: subprocess.CompletedProcess, code: int = 0) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}:\n{text[-4000:]}"
    return text


def _scheduler(run: Path) -> dict:
    return json.loads((run / "scheduler.json").read_text())


def _attempt(run: Path, stage: str, task: int) -> dict:
    return json.loads((run / stage / "attempts" / f"task_{task:05d}.json").read_text())


def _held(gate: Path) -> list[int]:
    """Pids of every process still holding the gate path on its command line (the task
    shells of the run, on any namespace host: they share this pid namespace)."""
    out = subprocess.run(["pgrep", "-f", str(gate)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _row(status: str, stage: str) -> list[str]:
    line = next(ln for ln in status.splitlines() if ln.startswith(f"{stage} "))
    return line.split()[1:6]  # tasks done running failed pending


def test_launch_returns_while_tasks_run_then_wait_until_every_stage(ns, tmp_path):
    run = tmp_path / "run"
    gate = _make_run(ns, run)
    out = _ok(run_launch("retry", str(run)))
    sched = _scheduler(run)
    pid = sched["pid"]
    assert f"detached: the scheduler (pid {pid})" in out, out
    assert "a: task(s) 0-1 started on n1, n2" in out and "submitted; watch with" in out
    assert sched["detached"] and sched["ended"] is None
    assert process_alive(pid, sched["process_start"])
    assert not (run / "a" / "completions").exists()  # launch returned; tasks are at the gate

    status = run_launch("status", str(run))
    text = _ok(status, 3)
    assert _row(text, "a") == ["3", "0", "2", "0", "1"] and _row(text, "b")[3:] == ["0", "1"]
    assert f"scheduler: running (pid {pid} on " in text and "detached" in text
    hosts = {_attempt(run, "a", t)["host"]: t for t in (0, 1)}
    assert set(hosts) == set(HOSTS)
    for host, task in hosts.items():
        assert f"  {host}: running a {task}" in text, text

    second = run_launch("retry", str(run))
    refusal = _ok(second, 1)
    assert f"in use by another launcher: pid {pid} on " in refusal, refusal
    assert "the detached scheduler of: " in refusal

    gate.touch()
    done = _ok(run_launch("wait", str(run), "--interval", "0.5", "--timeout", "300"))
    assert _row(done, "a")[:2] == ["3", "3"] and _row(done, "b")[:2] == ["1", "1"]
    assert "all stages complete" in done
    assert "scheduler: ended" in done and "(all stages complete)" in done
    assert _scheduler(run)["result"] == "all stages complete"
    # the third task went to the first slot that freed up: one attempt, on n1 or n2
    assert _attempt(run, "a", 2)["attempt"] == 1 and _attempt(run, "a", 2)["host"] in HOSTS
    logs = _ok(run_launch("logs", str(run), "b", "0"))
    assert "hello from task 0 rank 0" in logs
    assert not process_alive(pid, sched["process_start"])
    assert "scheduler: all stages complete" in (run / "scheduler.log").read_text()


def test_cancel_stops_the_scheduler_and_every_task_process(ns, tmp_path):
    run = tmp_path / "run"
    gate = _make_run(ns, run)
    _ok(run_launch("retry", str(run)))
    sched = _scheduler(run)
    pgids = [
        int((run / "a" / "attempts" / f"task_{t:05d}.rank0.a1.pid").read_text()) for t in (0, 1)
    ]
    assert len(_held(gate)) >= 2

    cancel = _ok(run_launch("cancel", str(run)))
    assert f"stopped the scheduler (pid {sched['pid']} on " in cancel, cancel
    assert "cancelled 2 job(s)/process(es)" in cancel, cancel
    assert not process_alive(sched["pid"], sched["process_start"])
    assert _held(gate) == [], "a task process is left on a host"
    for pgid in pgids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
    after = _ok(run_launch("status", str(run)), 3)
    assert _row(after, "a") == ["3", "0", "0", "0", "3"], after
    assert "scheduler: ended" in after and "its tasks were stopped" in after


def test_kill_9_of_the_scheduler_then_a_relaunch_adopts_and_finishes(ns, tmp_path):
    run = tmp_path / "run"
    gate = _make_run(ns, run)
    _ok(run_launch("retry", str(run)))
    first = _scheduler(run)
    os.kill(first["pid"], signal.SIGKILL)
    deadline = time.time() + 30
    while process_alive(first["pid"], first["process_start"]):
        assert time.time() < deadline, "the killed scheduler did not go"
        time.sleep(0.05)

    status = _ok(run_launch("status", str(run)), 3)
    assert f"scheduler gone: pid {first['pid']} on " in status, status
    assert "Relaunch to resume" in status and _row(status, "a")[2] == "2"
    stopped = _ok(run_launch("wait", str(run), "--interval", "0.5"), 1)  # nothing drives it
    assert "scheduler gone" in stopped

    again = _ok(run_launch("retry", str(run)))
    for t in (0, 1):
        assert f"[a {t}] adopting attempt 1 on " in again, again
    second = _scheduler(run)
    assert second["pid"] != first["pid"]
    gate.touch()
    _ok(run_launch("wait", str(run), "--interval", "0.5", "--timeout", "300"))
    for t in (0, 1, 2):
        rec = _attempt(run, "a", t)
        assert rec["attempt"] == 1 and rec["returncode"] == 0, rec
    assert len(list((run / "a" / "out").glob("*.json"))) == 3  # each task ran once
    assert _scheduler(run)["result"] == "all stages complete"


def test_dry_run_names_the_scheduler_and_prints_every_ssh_command(ns, tmp_path):
    run = tmp_path / "run"
    _make_run(ns, run)
    out = _ok(run_launch("retry", str(run), "--dry-run"))
    assert f"-m launchers.hosts.detached {run}" in out, out
    assert len([ln for ln in out.splitlines() if ln.startswith("$ ssh ")]) == 4, out
    assert not (run / "scheduler.json").exists() and not (run / "a").exists()


def test_a_task_failing_everywhere_ends_the_scheduler_and_wait_says_why(ns, tmp_path):
    """Task 1 exits 3 on every host: the scheduler retries it on the other host, then
    gives up; wait exits 1 with the reason, the task's last log lines and the host."""
    run = tmp_path / "run"
    gate = _make_run(ns, run, "+cluster.env.ECHO_FAIL_TASK=1")
    gate.touch()
    _ok(run_launch("retry", str(run)))
    out = _ok(run_launch("wait", str(run), "--interval", "0.5", "--timeout", "300"), 1)
    assert "failed a tasks 1:" in out, out
    assert "exit code 3 on " in out and "failing on purpose" in out
    assert "(a task(s) 1 failed)" in out
    assert _attempt(run, "a", 1)["attempt"] == 3  # the first try and max_task_retries (2)
    assert any(f"  {h}: failed a 1" in out for h in HOSTS), out
