"""Faults through launch.py, on the small curation pipeline of bench/faults.py (embed ->
merge -> kmeans -> curate -> metrics): the fault campaign with 3 kill points, Ctrl-C of a
real launcher, a second launcher of the same run dir, and kill -9 of the launcher then a
relaunch that adopts the tasks it left running. Each compares with one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from bench.faults import CONFIG, final_outputs, run_campaign, run_processes
from tests.conftest import run_launch, start_launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> dict:
    """3 kill points (seed 3: a task in embed, the launcher in k-means level 1, a task as
    curate starts), each rerun; the reference run stays under ``root/reference``."""
    root = tmp_path_factory.mktemp("faults")
    result = run_campaign(root, seed=3, kills=3, out=root / "result.json")
    result["root"] = root
    return result


# The interruption tests stop during embed: embed and merge are what they rerun and compare.
EMBED = ["stages=[embed,merge]"]


@pytest.fixture(scope="module")
def reference(campaign) -> dict[str, str]:
    """The uninterrupted run's embed and merge outputs."""
    outputs = final_outputs(campaign["root"] / "reference")
    return {k: v for k, v in outputs.items() if k.startswith(("embed/", "merge/"))}


def _launch(run: Path, *extra: str):
    args = [*CONFIG, *EMBED, *extra]
    return run_launch(*args, f"run.root={run.parent}", f"run.name={run.name}", timeout=1800)


def _start(run: Path, *extra: str):
    args = [*CONFIG, *EMBED, *extra]
    return start_launch(*args, f"run.root={run.parent}", f"run.name={run.name}")


def _attempts(run: Path, stage_dir: str) -> list[dict]:
    return [
        json.loads(p.read_text()) for p in sorted((run / stage_dir / "attempts").glob("*.json"))
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(cond, proc, timeout: float = 1200) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"the launcher ended early:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _embedding(run: Path) -> bool:
    """Both embed tasks are inside their task body (past start-up)."""
    logs = [run / f"embed/logs/task_{t:05d}.log" for t in (0, 1)]
    return all(p.exists() and "rows" in p.read_text() for p in logs)


def test_three_kill_points_each_rerun_end_identical(campaign):
    points = campaign["points"]
    # aimed at embed, k-means level 1 and curate (a kill may land later than aimed)
    assert [p["index"] for p in points] == [0, 1, 2]
    for p in points:
        assert p["landed"], f"kill point {p['index']} killed nothing: {p}"
        assert p["ok"], p
    assert campaign["final_exit"] == 0
    assert campaign["outputs_compared"] > 30 and campaign["outputs_differing"] == []
    assert campaign["stale_temporaries"] == [] and campaign["orphans"] == []
    assert campaign["markers_without_data"] == [] and campaign["passed"]


def test_ctrl_c_stops_every_task_at_once_and_a_rerun_resumes(campaign, reference):
    run = campaign["root"] / "ctrl-c"
    proc = _start(run)
    try:
        _wait_for(lambda: _embedding(run), proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted: 2 task(s) stopped; rerun the same command to resume" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    pids = [pid for rec in _attempts(run, "embed") for pid in rec["pids"]]
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)
    assert run_processes(run) == []
    for t in (0, 1):
        log = (run / f"embed/logs/task_{t:05d}.log").read_text()
        assert "interrupted by the launcher (SIGTERM)" in log
        assert "preemption" not in log and "outside SLURM" not in log
    again = _launch(run)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert final_outputs(run) == reference and len(reference) > 5


def test_a_second_launcher_is_refused_and_one_after_kill_9_adopts_the_tasks(campaign, reference):
    run = campaign["root"] / "orphans"
    first = _start(run)
    again = None
    orphans: list[int] = []
    try:
        _wait_for(lambda: _embedding(run), first)
        orphans = sorted(pid for rec in _attempts(run, "embed") for pid in rec["pids"])
        # Paused until the relaunch has found them, so that they cannot finish first.
        for pid in orphans:
            os.kill(pid, signal.SIGSTOP)
        # a second launcher of the run dir, with another config, is refused, changes nothing
        second = _launch(run, "curate.target_size=30")
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"is in use by another launcher: pid {first.pid} on" in second.stderr
        assert "Traceback" not in second.stderr
        assert "target_size: 40" in (run / "run.yaml").read_text()  # the first one's config
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert all(_alive(pid) for pid in orphans), "the tasks died with their launcher"
        again = _start(run)
        seen = []
        for line in again.stdout:
            seen.append(line)
            if sum("from an earlier launcher" in x for x in seen) == len(orphans):
                break
        for pid in orphans:
            os.kill(pid, signal.SIGCONT)
        rest, _ = again.communicate(timeout=1200)
        out = "".join(seen) + rest
    finally:
        first.kill()
        if again is not None:
            again.kill()
        for pid in orphans:  # never leave a paused process behind a failed assertion
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert again.returncode == 0, out[-3000:]
    for t, pid in enumerate(orphans):
        assert f"embed task {t}: adopting pid {pid} from an earlier launcher" in out
    # each shard was embedded once, by the orphan: no second copy was started
    records = _attempts(run, "embed")
    assert sorted(pid for rec in records for pid in rec["pids"]) == orphans
    assert all(rec["returncode"] == 0 for rec in records)
    assert "taking over the lock of a launcher that ended without releasing it" in out
    assert run_processes(run) == []
    assert final_outputs(run) == reference and len(reference) > 5
