"""``cluster.multihost.start_stagger_s`` and ``max_concurrent_starts`` on the real namespace
sshd hosts (n1, n2), with the trivial job (tests/unit/launchers/echo_job.py).

Every start's phase is in its attempt record: ``start_sent`` (when the launcher sent it,
its turn on the start clock), ``start_answered`` (when the host said it started) and
``ready`` (when the launcher saw the task's ready file: it has loaded). The tests check
facts the launcher enforces on those records, never how fast anything ran: sends at least
the stagger apart; at most N ssh starts overlapping; at most N tasks loading at once; a
stop during the staggered starts sends no start still waiting for its turn.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from itertools import pairwise

import pytest
from omegaconf import OmegaConf

from launchers.hosts.launcher import HostsLauncher
from launchers.hosts.starts import StartClock
from lib.config.schema import EmbedfleetConfig
from lib.core.paths import RunPaths
from lib.plan.spec import ARRAY, Plan, StageSpec
from tests.conftest import REPO

JOB = "tests.unit.launchers.echo_job"


def _cfg(ssh_hosts, slots: int, **multihost):
    # n3 may be cut off by tests/hosts/test_multihost.py
    hosts = [{"name": h, "slots": slots} for h in ("n1", "n2")]
    return ssh_hosts.hosts_config(hosts, **multihost)


def _attempts(run, n: int) -> list[dict]:
    return [
        json.loads((run / "a" / "attempts" / f"task_{t:05d}.json").read_text()) for t in range(n)
    ]


def _deepest(intervals: list[tuple[float, float]]) -> int:
    """How many of the [begin, end] intervals overlap at most, swept in time order (an end
    before a begin at the same instant)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    depth, deepest = 0, 0
    for _, step in events:
        depth += step
        deepest = max(deepest, depth)
    return deepest


@pytest.fixture(scope="module")
def ns(ssh_hosts):
    return ssh_hosts.need_ns({"n1", "n2"})


def test_the_defaults_are_no_stagger_and_32_starts_at_once():
    mh = OmegaConf.structured(EmbedfleetConfig).cluster.multihost
    assert (mh.start_stagger_s, mh.max_concurrent_starts) == (0.0, 32)


def test_start_clock_spaces_turns_and_gives_up_when_stopped():
    clock = StartClock(0.2)
    turns = [clock.turn() for _ in range(3)]
    assert all(b - a >= 0.2 for a, b in pairwise(turns))
    assert clock.turn(lambda: True) is None  # stopped while waiting: no turn
    assert StartClock(0).turn(lambda: True) is None


def test_starts_are_sent_at_least_the_stagger_apart(ns, tmp_path, capsys):
    """4 tasks that all fit at once (2 slots on each of 2 hosts): their starts are sent
    0.5 s apart at least, each answered, each task done."""
    cfg = _cfg(ns, 2, start_stagger_s=0.5)
    spec = StageSpec("a", "embed", JOB, "a", ARRAY, 4, "h")
    result = HostsLauncher(cfg, echo=False).launch(RunPaths(str(tmp_path)), Plan([spec], 0))
    assert result.complete, capsys.readouterr().out
    recs = _attempts(tmp_path, 4)
    assert all(r["returncode"] == 0 and r["start_answered"] >= r["start_sent"] for r in recs)
    sent = sorted(r["start_sent"] for r in recs)
    gaps = [b - a for a, b in pairwise(sent)]
    assert min(gaps) >= 0.5, gaps
    assert all(r["start_sent"] >= r["started"] for r in recs)  # sent after it was placed


@pytest.mark.parametrize("limit,tasks", [(1, 4), (2, 6)])
def test_at_most_max_concurrent_starts_in_their_start_phase(ns, tmp_path, capsys, limit, tasks):
    """All tasks fit on the hosts' slots at once; the recorded ssh starts [start_sent,
    start_answered] never overlap more than ``max_concurrent_starts`` deep (a start
    phase lasts until the task is ready, so a later start waits for that too; where the
    tasks then go is whichever slot is free)."""
    cfg = _cfg(ns, tasks // 2, max_concurrent_starts=limit)
    spec = StageSpec("a", "embed", JOB, "a", ARRAY, tasks, "h")
    result = HostsLauncher(cfg, echo=False).launch(RunPaths(str(tmp_path)), Plan([spec], 0))
    assert result.complete, capsys.readouterr().out
    recs = _attempts(tmp_path, tasks)
    assert all(r["ready"] >= r["start_answered"] for r in recs), recs
    assert _deepest([(r["start_sent"], r["start_answered"]) for r in recs]) <= limit, recs
    if limit == 1:  # one at a time: each phase begins after the previous one ended
        phases = sorted((r["start_sent"], r["start_answered"]) for r in recs)
        assert all(b[0] >= a[1] for a, b in pairwise(phases)), phases


@pytest.mark.parametrize("limit", [1, 2])
def test_at_most_max_concurrent_starts_tasks_load_at_once(ns, tmp_path, capsys, limit):
    """Tasks that take a second to load (the echo job with ECHO_LOAD_S=1: it sleeps, then
    creates its ready file, lib.runtime.ready): 4 tasks, 2 hosts x 2 slots, so all would
    fit at once. With max_concurrent_starts=limit the tasks' own loading intervals
    [began, ready] never overlap more than ``limit`` deep: a start waits until the
    launcher has seen an earlier task ready (or ended). Each record keeps when it did."""
    hosts = [{"name": h, "slots": 2, "env": {"ECHO_LOAD_S": "1"}} for h in ("n1", "n2")]
    cfg = ns.hosts_config(hosts, max_concurrent_starts=limit)
    spec = StageSpec("a", "embed", JOB, "a", ARRAY, 4, "h")
    result = HostsLauncher(cfg, echo=False).launch(RunPaths(str(tmp_path)), Plan([spec], 0))
    assert result.complete, capsys.readouterr().out
    outs = [json.loads((tmp_path / "a" / "out" / f"{t}.0.json").read_text()) for t in range(4)]
    assert _deepest([tuple(o["loading"]) for o in outs]) <= limit, outs
    recs = _attempts(tmp_path, 4)
    assert all(r["ready"] >= o["loading"][1] for r, o in zip(recs, outs, strict=True))
    # the (limit+1)-th start went out only after some task's ready had been seen
    sent = sorted(r["start_sent"] for r in recs)
    assert sent[limit] >= min(r["ready"] for r in recs), recs


HOLD_LAUNCH = """
import json, sys
from omegaconf import OmegaConf
from launchers.hosts.launcher import HostsLauncher
from lib.core.paths import RunPaths
from lib.plan.spec import Plan, StageSpec
cfg = OmegaConf.create(json.loads(sys.argv[2]))
spec = StageSpec("a", "embed", sys.argv[3], "a", "array", 3, "h")
result = HostsLauncher(cfg).launch(RunPaths(sys.argv[1]), Plan([spec], 0))
sys.exit(130 if result.interrupted else 0)
"""


def test_a_stop_during_staggered_starts_sends_no_waiting_start(ns, tmp_path):
    """Starts 600 s apart: SIGTERM once the first task runs. The launcher stops it and
    ends without sending the two starts still waiting for their turn (no start_sent, no
    pid file), all three recorded as stopped. (A stagger slept in the scheduling loop
    sent all three first, 20 minutes later.)"""
    cfg = _cfg(ns, 2, start_stagger_s=600, setup=["sleep 600"])
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LAUNCH, str(run), json.dumps(OmegaConf.to_container(cfg)), JOB],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    attempts = run / "a" / "attempts"
    try:
        deadline = time.time() + 120
        while not (pids := list(attempts.glob("task_*.rank0.a1.pid"))):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the first task did not start"
            time.sleep(0.05)
        time.sleep(0.2)  # the pid file is written whole (renamed into place)
        pgid = int(pids[0].read_text())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    recs = _attempts(run, 3)
    assert all(r["interrupted"] for r in recs), recs
    sent = [t for t, r in enumerate(recs) if "start_sent" in r]
    assert len(sent) == 1, recs  # the first turn only
    assert [p.name for p in attempts.glob("task_*.pid")] == [f"task_{sent[0]:05d}.rank0.a1.pid"]
    ps = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True)
    assert all(s.startswith("Z") for s in ps.stdout.split()), ps.stdout  # task 0 stopped
