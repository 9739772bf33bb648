"""Live logs under ``cluster.multihost.storage=sync`` on the real namespace sshd hosts n1 and
n2, each with a workdir (and so a run dir) of its own: a task's log is written on its host
and comes back into the local run dir only when the task ends, so ``logs`` reads a running
task's log from its host, and ``--attach`` streams it from there in the probe rounds.

The tasks are held in a setup line (they print, then wait for a gate file the test creates;
the hosts share this machine's file system), so "while it runs" is a fact of the test, not
a matter of timing: nothing can end before the gate is there.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from pathlib import Path

import pytest

from cli.commands import run_subcommand
from cli.run import save_run_config
from lib.config.compose import register_resolvers
from lib.core.paths import RunPaths
from lib.plan.spec import ARRAY, Plan, StageSpec
from tests.conftest import start_launch

JOB = "tests.unit.launchers.echo_job"
WAIT_S = 120  # only a bound for a broken run; the test waits for facts, not durations


@pytest.fixture(scope="module")
def ns(ssh_hosts):
    return ssh_hosts.need_ns({"n1", "n2"})


def _attempt(run: Path, task: int) -> dict:
    path = run / "a" / "attempts" / f"task_{task:05d}.json"
    return json.loads(path.read_text()) if path.exists() else {}


class _Lines:
    """The lines a process prints, read as they come (a thread)."""

    def __init__(self, proc) -> None:
        self.proc, self.lines = proc, []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, wanted: list[str]) -> None:
        deadline = time.time() + WAIT_S
        while not all(w in self.lines for w in wanted):
            assert self.proc.poll() is None or self._thread.is_alive(), "\n".join(self.lines)
            assert time.time() < deadline, "never printed:\n" + "\n".join(self.lines)
            time.sleep(0.1)

    def rest(self) -> list[str]:
        self.proc.wait(timeout=WAIT_S)
        self._thread.join(timeout=30)
        return self.lines


def test_logs_and_attach_read_running_tasks_logs_from_their_hosts(ns, tmp_path, capsys):
    """Two tasks held in their setup line, one on each host: ``launch.py retry RUN
    --attach`` prints each task's first lines prefixed ``[host a task]`` while it is still
    held (its attempt not ended, no local copy of its log), a line printed in two pieces
    once, whole; ``logs RUN a T`` prints the running task's log read from the host its
    attempt record names, and says which on stderr. Released, the tasks end, each line was
    echoed once, and ``logs`` reads the local (pulled) copy. A host that cannot be
    reached is an error naming it."""
    register_resolvers()  # run.yaml is saved resolved
    gate = tmp_path / "gate"
    dirs = {"n1": tmp_path / "w1", "n2": tmp_path / "w2"}
    setup = (
        'echo "first line of task $EMBEDFLEET_TASK_INDEX"; printf "no newline yet"; '
        f"while [ ! -e {shlex.quote(str(gate))} ]; do sleep 0.1; done; echo ' and its end'"
    )
    cfg = ns.hosts_config(
        [{"name": h, "workdir": str(d)} for h, d in dirs.items()],
        storage="sync",
        code_sync="rsync",
        setup=[setup],
    )
    run = tmp_path / "lg"
    cfg.run.name, cfg.run.root, cfg.run.dir = "lg", str(tmp_path), str(run)
    paths = RunPaths(str(run))
    save_run_config(paths, cfg)
    Plan([StageSpec("a", "embed", JOB, "a", ARRAY, 2, "h")], 0).save(paths)

    proc = start_launch("retry", str(run), "--attach")
    try:
        out = _Lines(proc)
        hosts = {}
        deadline = time.time() + WAIT_S
        while len(hosts) < 2:
            hosts = {t: _attempt(run, t).get("host") for t in range(2) if _attempt(run, t)}
            hosts = {t: h for t, h in hosts.items() if h}
            assert time.time() < deadline and proc.poll() is None, "\n".join(out.lines)
            time.sleep(0.1)
        assert set(hosts.values()) == {"n1", "n2"}, hosts
        out.wait_for([f"[{hosts[t]} a {t}] first line of task {t}" for t in range(2)])
        for t in range(2):
            # still held: the attempt has not ended, its log is only on its host
            assert _attempt(run, t)["ended"] is None
            assert not (run / "a" / "logs" / f"task_{t:05d}.log").exists()
            capsys.readouterr()
            assert run_subcommand(["logs", str(run), "a", str(t)]) == 0
            got = capsys.readouterr()
            assert got.out == f"first line of task {t}\nno newline yet\n", got
            there = dirs[hosts[t]] / "runs" / "lg" / "a" / "logs" / f"task_{t:05d}.log"
            assert f"the log on host {hosts[t]}: {there} (running)" in got.err, got.err
            assert run_subcommand(["logs", str(run), "a", str(t), "--tail", "1"]) == 0
            assert capsys.readouterr().out == "no newline yet\n"
        gate.touch()
        lines = out.rest()
    finally:
        gate.touch()  # a failed test leaves no task held on the hosts
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "\n".join(lines)
    for t in range(2):
        prefix = f"[{hosts[t]} a {t}]"
        assert lines.count(f"{prefix} first line of task {t}") == 1, lines
        assert lines.count(f"{prefix} no newline yet and its end") == 1, lines
        assert lines.count(f"{prefix} hello from task {t} rank 0") == 1, lines
        assert not [ln for ln in lines if ln.startswith(prefix) and ln.endswith("no newline yet")]
        assert _attempt(run, t)["returncode"] == 0
        assert run_subcommand(["logs", str(run), "a", str(t)]) == 0
        got = capsys.readouterr()
        assert f"no newline yet and its end\nhello from task {t} rank 0\n" in got.out
        assert "the log on host" not in got.err  # the local copy, pulled as it ended

    # A running attempt on a host that cannot be reached (n1 at a port nothing listens at).
    down = ns.hosts_config(
        [{"name": "n1", "port": 1, "workdir": str(tmp_path / "w9")}], storage="sync"
    )
    down.run.name, down.run.root, down.run.dir = "dn", str(tmp_path), str(tmp_path / "dn")
    dn = RunPaths(str(tmp_path / "dn"))
    save_run_config(dn, down)
    spec = StageSpec("a", "embed", JOB, "a", ARRAY, 1, "h")
    Plan([spec], 0).save(dn)
    dn.storage.publish_json(
        dn.attempt("a", 0),
        {"launcher": "hosts", "attempt": 1, "host": "n1", "ended": None,
         "placements": [{"worker": 0, "host": "n1", "rank": 0}]},
    )  # fmt: skip
    capsys.readouterr()
    assert run_subcommand(["logs", dn.root, "a", "0"]) == 1
    err = capsys.readouterr().err
    assert "cannot read the log of a task 0 from host n1" in err, err
    assert f"{tmp_path}/w9/runs/dn/a/logs/task_00000.log" in err
