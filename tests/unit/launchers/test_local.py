"""The local launcher: tasks as processes, parallelism and core shares, distributed ranks,
failures and resume, attempt records and the scheduler view, process-group reaping and
cancel, Ctrl-C, adopting the live tasks of a launcher that died; with a tiny job module
(``echo_job``), in real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from omegaconf import OmegaConf

from cli.status import collect_status, render_status
from launchers import get_launcher, local
from launchers.base import FAILED, PENDING, RUNNING, write_attempt
from launchers.local import LocalLauncher
from lib.core.errors import ConfigError
from lib.core.locks import process_start
from lib.core.paths import RunPaths
from lib.core.repo import REPO_ROOT
from lib.plan.spec import ARRAY, DISTRIBUTED, Plan, StageSpec
from lib.runtime.identity import TaskIdentity, identity_env

JOB = "tests.unit.launchers.echo_job"


def _cfg(parallelism: int = 2, **env: str):
    return OmegaConf.create(
        {"cluster": {"launcher": "local", "num_gpus": 0, "parallelism": parallelism, "env": env}}
    )


def _plan(*specs: StageSpec) -> Plan:
    return Plan(list(specs), 0)


def _stage(name: str, tasks: int, kind: str = ARRAY, world: int = 1, deps=()) -> StageSpec:
    return StageSpec(name, "embed", JOB, name, kind, tasks, "h", world_size=world, depends_on=deps)


def _records(run, stage: str) -> dict[tuple[int, int], dict]:
    out = {}
    for p in (run / stage / "out").glob("*.*.json"):
        task, rank = (int(x) for x in p.stem.split("."))
        out[(task, rank)] = json.loads(p.read_text())
    return out


def test_tasks_run_in_parallel_with_disjoint_cores_and_their_own_logs(tmp_path, capsys):
    paths = RunPaths(tmp_path)
    result = LocalLauncher(_cfg(parallelism=2)).launch(paths, _plan(_stage("s", 4)))
    assert result.complete and not result.failed
    rec = _records(tmp_path, "s")
    assert sorted(rec) == [(t, 0) for t in range(4)]
    assert all(r["EMBEDFLEET_LAUNCHER"] == "local" and r["world"] == 1 for r in rec.values())
    cores = {r["EMBEDFLEET_CPU_CORES"] for r in rec.values()}
    assert all(
        r["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2)) for r in rec.values()
    )
    assert len(cores) == min(2, len(os.sched_getaffinity(0)))  # two slots, two shares
    for t in range(4):
        log = (tmp_path / paths.log("s", t)).read_text()
        assert f"hello from task {t} rank 0" in log and "local attempt" in log
        attempt = json.loads((tmp_path / paths.attempt("s", t)).read_text())
        assert attempt["returncode"] == 0 and attempt["launcher"] == "local"
    out = capsys.readouterr().out
    assert "[s 3] hello from task 3 rank 0" in out and "s: done in" in out


def test_a_failed_task_stops_later_stages_and_a_relaunch_runs_only_it(tmp_path, capsys):
    paths = RunPaths(tmp_path)
    plan = _plan(_stage("a", 3), _stage("b", 1, deps=("a",)))
    result = LocalLauncher(_cfg(ECHO_FAIL_TASK="1")).launch(paths, plan)
    assert not result.complete and result.failed == {"a": [1]}
    assert "[a 1] FAILED (exit code 3)" in capsys.readouterr().out
    assert not (tmp_path / "b").exists()  # no later stage started
    view = LocalLauncher(_cfg()).scheduler_view(paths, plan)
    assert view[("a", 1)] == (FAILED, "exit code 3")
    statuses = collect_status(paths, plan, view)
    assert statuses[0].having(FAILED) == [1] and statuses[1].having(PENDING) == [0]
    text = render_status(paths, statuses)
    assert "failed a tasks 1:" in text and f"log {tmp_path}/a/logs/task_00001.log" in text

    again = LocalLauncher(_cfg()).launch(paths, plan)
    assert again.complete
    out = capsys.readouterr().out
    assert "a: resuming: 2 of 3 task(s) complete, running 1" in out
    assert "all stages complete" in render_status(paths, collect_status(paths, plan, {}))


def test_a_distributed_task_gets_ranks_a_rendezvous_and_one_log_per_rank(tmp_path):
    paths = RunPaths(tmp_path)
    LocalLauncher(_cfg()).launch(paths, _plan(_stage("d", 1, DISTRIBUTED, world=3)))
    rec = _records(tmp_path, "d")
    assert sorted(rec) == [(0, 0), (0, 1), (0, 2)]
    assert {r["RANK"] for r in rec.values()} == {"0", "1", "2"}
    assert {r["WORLD_SIZE"] for r in rec.values()} == {"3"}
    assert {r["LOCAL_RANK"] for r in rec.values()} == {"0", "1", "2"}
    assert len({r["MASTER_PORT"] for r in rec.values()}) == 1  # one rendezvous
    for rank in range(3):
        assert f"rank {rank}" in (tmp_path / paths.log("d", 0, rank)).read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_what_a_task_leaves_behind_is_reaped(tmp_path):
    LocalLauncher(_cfg(ECHO_CHILD="1")).launch(RunPaths(tmp_path), _plan(_stage("c", 1)))
    child = json.loads((tmp_path / "c" / "out" / "child.json").read_text())["pid"]
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the task's child outlived it"


def test_cancel_stops_a_running_task(tmp_path):
    paths = RunPaths(tmp_path)
    plan = _plan(_stage("w", 1))
    launcher = LocalLauncher(_cfg(ECHO_SLEEP="120"), echo=False)
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=launcher.launch(paths, plan)))
    thread.start()
    deadline = time.time() + 60
    while not (tmp_path / "w" / "out" / "0.0.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert launcher.scheduler_view(paths, plan)[("w", 0)][0] == RUNNING
    assert launcher.cancel(paths, plan) == 1
    thread.join(timeout=60)
    assert result["r"].failed == {"w": [0]}
    assert launcher.scheduler_view(paths, plan)[("w", 0)][0] == FAILED


def test_the_launcher_table_names_the_known_launchers():
    assert type(get_launcher(_cfg())) is LocalLauncher
    with pytest.raises(
        ConfigError, match="no such launcher; known: local, slurm, submitit, hosts, tpu_vm"
    ):
        get_launcher(OmegaConf.create({"cluster": {"launcher": "k8s"}}))


# -- Ctrl-C: every task signalled at once, none left alive, one line ------------------------
def _interrupt_when(paths_ready, times: int = 1, gap: float = 0.5) -> threading.Thread:
    """SIGINT this process (the launcher) once ``paths_ready()`` holds, ``times`` times."""

    def fire() -> None:
        deadline = time.time() + 60
        while not paths_ready() and time.time() < deadline:
            time.sleep(0.05)
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(gap)

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    return thread


def _attempt_pids(tmp_path, stage: str, tasks: int) -> list[int]:
    paths = RunPaths(tmp_path)
    return [
        pid
        for t in range(tasks)
        for pid in json.loads((tmp_path / paths.attempt(stage, t)).read_text())["pids"]
    ]


def test_ctrl_c_stops_every_task_and_leaves_no_child(tmp_path, capsys):
    paths = RunPaths(tmp_path)
    plan = _plan(_stage("w", 2))
    started = lambda: len(list((tmp_path / "w" / "out").glob("*.json"))) == 2  # noqa: E731
    _interrupt_when(started)
    before = signal.getsignal(signal.SIGINT)  # ignored when pytest itself runs in background
    result = LocalLauncher(_cfg(ECHO_SLEEP="120")).launch(paths, plan)
    assert result.interrupted == 2 and not result.complete and not result.failed
    out = capsys.readouterr().out
    assert "interrupted: 2 task(s) stopped; rerun the same command to resume" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert not any(_alive(pid) for pid in _attempt_pids(tmp_path, "w", 2))
    view = LocalLauncher(_cfg()).scheduler_view(paths, plan)
    assert view[("w", 0)][0] == PENDING and "interrupted" in view[("w", 0)][1]
    # the signal handlers are the process's own again, and a rerun finishes the stage
    assert signal.getsignal(signal.SIGINT) is before
    assert LocalLauncher(_cfg()).launch(paths, plan).complete


def test_a_second_ctrl_c_kills_tasks_that_ignore_sigterm(tmp_path, capsys):
    paths = RunPaths(tmp_path)
    started = lambda: len(list((tmp_path / "w" / "out").glob("*.json"))) == 2  # noqa: E731
    _interrupt_when(started, times=2)
    cfg = _cfg(ECHO_SLEEP="120", ECHO_IGNORE_TERM="1")
    result = LocalLauncher(cfg).launch(paths, _plan(_stage("w", 2)))
    assert result.interrupted == 2
    assert not any(_alive(pid) for pid in _attempt_pids(tmp_path, "w", 2))
    for t in range(2):
        assert json.loads((tmp_path / paths.attempt("w", t)).read_text())["returncode"] == -9
    assert "interrupted: 2 task(s) stopped" in capsys.readouterr().out


def test_tasks_that_ignore_sigterm_are_killed_after_the_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "STOP_GRACE_S", 0.5)
    paths = RunPaths(tmp_path)
    _interrupt_when(lambda: (tmp_path / "w" / "out" / "0.0.json").exists())
    cfg = _cfg(ECHO_SLEEP="120", ECHO_IGNORE_TERM="1")
    result = LocalLauncher(cfg, echo=False).launch(paths, _plan(_stage("w", 1)))
    assert result.interrupted == 1
    assert not any(_alive(pid) for pid in _attempt_pids(tmp_path, "w", 1))


# -- adopting the live tasks of a launcher that died ----------------------------------------
def _orphan(tmp_path, spec: StageSpec, *, launcher_pid: int, **env: str) -> subprocess.Popen:
    """A task process as a launcher that then died (kill -9) would have left it: started
    in its own session, its attempt record written, nobody reading its output."""
    paths = RunPaths(tmp_path)
    identity = TaskIdentity(paths.root, spec.name, 0, spec.num_tasks)
    full = {**os.environ, **identity_env(identity, "local"), **env, "PYTHONPATH": str(REPO_ROOT)}
    log = tmp_path / paths.log(spec.name, 0)
    log.parent.mkdir(parents=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            spec.command(sys.executable, paths.root),
            env=full,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
    write_attempt(
        paths,
        spec,
        0,
        launcher="local",
        host=socket.gethostname(),
        launcher_pid=launcher_pid,
        pids=[proc.pid],
        process_starts=[process_start(proc.pid)],
        started=time.time(),
        ended=None,
        returncode=None,
    )
    return proc


def test_a_relaunch_adopts_a_task_left_running_instead_of_starting_it_again(tmp_path, capsys):
    paths = RunPaths(tmp_path)
    spec = _stage("s", 1)
    orphan = _orphan(tmp_path, spec, launcher_pid=-1, ECHO_SLEEP="2")
    result = LocalLauncher(_cfg()).launch(paths, _plan(spec))
    assert result.complete and not result.failed
    out = capsys.readouterr().out
    assert f"s task 0: adopting pid {orphan.pid} from an earlier launcher" in out
    assert "[s 0]" not in out.split("adopting")[0]  # nothing started before the adoption
    # the task ran once, as the orphan: a second copy would have recorded its own pid
    assert _records(tmp_path, "s")[(0, 0)]["pid"] == orphan.pid
    record = json.loads((tmp_path / paths.attempt("s", 0)).read_text())
    assert record["adopted_by"] == os.getpid() and record["returncode"] == 0
    orphan.wait(timeout=30)


def test_an_adopted_task_that_ends_without_a_marker_is_a_failure(tmp_path, capsys):
    spec = _stage("s", 1)
    _orphan(tmp_path, spec, launcher_pid=-1, ECHO_FAIL_TASK="0", ECHO_SLEEP="1")
    result = LocalLauncher(_cfg()).launch(RunPaths(tmp_path), _plan(spec))
    assert result.failed == {"s": [0]}
    assert "[s 0] FAILED (it ended without a completion marker)" in capsys.readouterr().out


def test_a_reused_pid_is_not_taken_for_the_task(tmp_path, capsys):
    """The record's pid now names another process (here: this one): the task runs."""
    paths = RunPaths(tmp_path)
    spec = _stage("s", 1)
    write_attempt(
        paths,
        spec,
        0,
        launcher="local",
        host=socket.gethostname(),
        launcher_pid=-1,
        pids=[os.getpid()],
        process_starts=["another-boot:1"],
        started=time.time(),
        ended=None,
    )
    assert LocalLauncher(_cfg()).scheduler_view(paths, _plan(spec))[("s", 0)][0] == FAILED
    assert LocalLauncher(_cfg()).launch(paths, _plan(spec)).complete
    assert "adopting" not in capsys.readouterr().out
    assert _records(tmp_path, "s")[(0, 0)]["pid"] != os.getpid()
