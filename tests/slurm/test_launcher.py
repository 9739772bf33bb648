"""The SLURM and submitit launchers against the real test cluster (scripts/slurm/up.sh).

Slurm holds a requeued job for ~2 minutes before it is eligible again; where a test
requeues, it releases the job early with `scontrol update StartTime=now` so the suite
stays short. Nothing else about the cluster is faked.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli.run import save_run_config
from launchers.slurm.launcher import SlurmLauncher
from launchers.slurm.queue import load_submissions
from launchers.slurm.render import job_name
from lib.config.compose import compose
from lib.core.markers import CompletionMarker, write_marker
from lib.core.paths import RunPaths
from lib.formats.arrays import open_embeddings
from lib.plan.spec import ARRAY, DISTRIBUTED, Plan, StageSpec, completed_tasks
from tests.conftest import REPO, run_launch

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLICE = [
    "+experiment=quickstart",
    "dataset.limit=90",
    "embed.num_shards=3",
    "embed.torch_threads=1",
    "merge.by_source=false",
]


def _ok(proc):
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout.strip()


def launch_cli(*args: str):
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )


def wait_run(run: Path, timeout: float = 600) -> str:
    """Poll `launch.py status` until the run completes, or nothing is queued any more (then
    give sacct a few seconds to catch up); release requeue holds meanwhile. Returns the
    last status text."""
    deadline = time.time() + timeout
    idle_since = None
    while time.time() < deadline:
        release_begin_time_holds(run)
        status = launch_cli("status", str(run)).stdout
        if "all stages complete" in status:
            return status
        if _active(run):
            idle_since = None
        else:
            idle_since = idle_since or time.time()
            if time.time() - idle_since > 8:
                return status
        time.sleep(2)
    raise AssertionError(
        f"run {run} did not finish in {timeout}s:\n{launch_cli('status', str(run)).stdout}"
    )


def _active(run: Path) -> bool:
    subs = load_submissions(run)
    if not subs:
        return False
    return bool(sh("squeue", "-h", "-j", ",".join(s.job_id for s in subs), check=False))


def release_begin_time_holds(run: Path) -> None:
    for s in load_submissions(run):
        out = sh("squeue", "-h", "-r", "-j", s.job_id, "-o", "%i|%r", check=False)
        for line in out.splitlines():
            job, reason = line.split("|")
            if reason == "BeginTime":
                subprocess.run(
                    ["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True
                )


def merged(run: Path) -> np.ndarray:
    return np.asarray(open_embeddings(run / "merge" / "embeddings.safetensors"))


@pytest.fixture(scope="module")
def local_reference(shared_root) -> Path:
    _ok(run_launch(*SLICE, f"run.root={shared_root}", "run.name=slurm-ref"))
    return shared_root / "slurm-ref"


@pytest.mark.parametrize("launcher", ["slurm", "submitit"])
def test_pipeline_on_slurm_equals_local(slurm_cluster, shared_root, local_reference, launcher):
    run = shared_root / f"on-{launcher}"
    proc = _ok(
        run_launch(
            *SLICE, f"cluster={launcher}", f"run.root={shared_root}", f"run.name=on-{launcher}"
        )
    )
    assert "submitted" in proc.stdout
    done = wait_run(run)
    assert "all stages complete" in done, done
    assert np.array_equal(merged(run), merged(local_reference))
    assert pq.read_table(run / "merge" / "metadata.parquet").equals(
        pq.read_table(local_reference / "merge" / "metadata.parquet")
    )
    if launcher == "slurm":
        scripts = sorted((run / "slurm").glob("*.sbatch"))
        assert [p.name for p in scripts] == ["embed-001.sbatch", "merge-002.sbatch"]
        assert scripts[1].read_text().startswith("#!/bin/bash\n# Run with: ")
        subs = load_submissions(run)
        merge_script = scripts[1].read_text()
        assert "--dependency" not in merge_script  # dependencies go on the sbatch command line
        assert len(subs) == 2
        log = (run / "embed" / "logs" / "task_00002.log").read_text()
        assert "slurm job" in log and "task 2 done" in log


def test_failed_task_is_named_merge_fails_clearly_and_retry_redoes_only_it(slurm_cluster, tmp_path):
    data = tmp_path / "d.parquet"
    texts = [f"Sentence number {i} about parsing configuration files." for i in range(30)]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(30)], "text": texts}), data)
    # Task 1 fails on a fault outside its input (a changed input is refused, not retried):
    # a directory where its shard is published.
    run = tmp_path / "fail"
    obstacle = run / RunPaths.embed_shard(1).embeddings
    obstacle.mkdir(parents=True)
    args = [
        "+experiment=quickstart",
        f"dataset.path={data}",
        "embed.num_shards=3",
        "cluster=slurm",
        f"run.root={tmp_path}",
        "run.name=fail",
        "merge.by_source=false",
    ]
    _ok(run_launch(*args))
    status = wait_run(run)
    assert "failed embed tasks 1:" in status and "FAILED exit 1:0" in status
    assert "merge                   1      0        0       1" in status
    sacct = sh(
        "sacct", "-X", "-n", "-P", "-j", load_submissions(run)[0].job_id, "-o", "JobID,State"
    )
    assert f"{load_submissions(run)[0].job_id}_1|FAILED" in sacct
    merge_log = (run / "merge" / "logs" / "task_00000.log").read_text()
    assert (
        "merge cannot start: stage 'embed' has 1 of 3 task(s) without a completion marker: 1"
        in merge_log
    )
    assert "Is a directory" in (run / "embed" / "logs" / "task_00001.log").read_text()

    obstacle.rmdir()
    retry = _ok(launch_cli("retry", str(run)))
    assert "embed: submitted 1 task(s) in 1 array job(s)" in retry.stdout
    script = sorted((run / "slurm").glob("embed-*.sbatch"))[-1].read_text()
    assert "#SBATCH --array=1\n" in script and "EMBEDFLEET_TASK_OFFSET=0" in script
    assert "merge: submitted 1 job" in retry.stdout
    done = wait_run(run)
    assert "all stages complete" in done, done
    assert open_embeddings(run / "merge" / "embeddings.safetensors").shape == (30, 384)


def _long_run_args(root: Path, name: str) -> list[str]:
    # One shard of 150 rows in five 30-row parts. The tests hold the task (SIGSTOP) at the
    # moment they need, so the run need not be long: only the parts it still has to do
    # after the interruption matter, and the machine's speed does not.
    return [
        "+experiment=quickstart",
        f"dataset.limit={LONG_ROWS}",
        "embed.num_shards=1",
        "embed.part_rows=30",
        "embed.torch_threads=1",
        "merge.by_source=false",
        f"run.root={root}",
        f"run.name={name}",
    ]


LONG_ROWS = 150
USR2_BIT = 1 << (signal.SIGUSR2 - 1)


@pytest.fixture(scope="module")
def long_reference(shared_root) -> Path:
    _ok(run_launch(*_long_run_args(shared_root, "long-ref")))
    return shared_root / "long-ref"


def _parts_done(run: Path) -> int:
    return len(list((run / "embed" / "parts").glob("shard_00000/part_*.json")))


def _task_pid(run: Path) -> int | None:
    """The pid of the process holding task 0's lock (its record names the holder)."""
    lock = run / RunPaths.task_lock("embed", 0)
    try:
        return int(json.loads(lock.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def hold_task_after(run: Path, parts: int, timeout: float = 600) -> int:
    """SIGSTOP the running task as soon as it has published ``parts`` parts (it then has
    the rest still to do, however fast this machine is). Returns its pid."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pid = _task_pid(run)
        if pid and _parts_done(run) >= parts:
            os.kill(pid, signal.SIGSTOP)
            assert _parts_done(run) < LONG_ROWS // 30, "the task finished before it was held"
            return pid
        time.sleep(0.2)
    raise AssertionError(f"the task never published {parts} part(s)")


def _pending_signals(pid: int) -> int:
    """The signals pending for process ``pid`` (/proc/PID/status ShdPnd | SigPnd)."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)


@pytest.mark.timeout(1200)
def test_scontrol_requeue_resumes_from_finished_parts(slurm_cluster, shared_root, long_reference):
    run = shared_root / "requeued"
    _ok(run_launch(*_long_run_args(shared_root, "requeued"), "cluster=slurm"))
    job = load_submissions(run)[0].job_id + "_0"
    hold_task_after(run, 2)  # requeued mid-shard, with three parts to go
    subprocess.run(["scontrol", "requeue", job], check=True)
    done = wait_run(run, timeout=900)
    assert "all stages complete" in done, done
    log = (run / "embed" / "logs" / "task_00000.log").read_text()
    assert "restart 1" in log and "already done" in log
    assert np.array_equal(merged(run), merged(long_reference))


@pytest.mark.timeout(1200)
def test_time_limit_signal_stops_requeues_and_resumes(slurm_cluster, shared_root, long_reference):
    # SLURM sends the warning signal (--signal=B:USR2@60) when a check (every ~30 s) finds
    # the job within 60 s + one check interval of its 2-minute limit: 30-60 s in. The task
    # is held (SIGSTOP) after its first part until SLURM's SIGUSR2 is pending, then
    # continued: it must stop at the next part boundary, requeue itself and resume.
    run = shared_root / "timelimit"
    args = [
        *_long_run_args(shared_root, "timelimit"),
        "cluster=slurm",
        "cluster.slurm.resources.embed.time=00:02:00",
        "cluster.slurm.signal_delay_s=60",
        "cluster.slurm.max_restarts=20",
    ]
    _ok(run_launch(*args))
    pid = hold_task_after(run, 1)
    log_file = run / "embed" / "logs" / "task_00000.log"
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            if _pending_signals(pid) & USR2_BIT or "received SIGUSR2" in log_file.read_text():
                break
            time.sleep(0.5)
        else:
            raise AssertionError("SLURM never sent the time-limit warning signal (SIGUSR2)")
    finally:
        os.kill(pid, signal.SIGCONT)
    done = wait_run(run, timeout=900)
    assert "all stages complete" in done, done
    log = log_file.read_text()
    assert "received SIGUSR2" in log and "timeout: requeued job" in log, log[-3000:]
    assert "already done" in log
    assert np.array_equal(merged(run), merged(long_reference))


def _touch_plan(run: Path, tasks: int, kind: str = ARRAY, world: int = 1) -> tuple:
    cfg = compose(["+experiment=quickstart", "cluster=slurm"])
    cfg.run.root, cfg.run.name, cfg.run.dir = str(run.parent), run.name, str(run)
    spec = StageSpec(
        "touch",
        "embed",
        "tests.slurm.jobs.touch" if kind == ARRAY else "tests.slurm.jobs.allreduce",
        "touch",
        kind,
        tasks,
        "touch",
        world_size=world,
    )
    plan = Plan([spec], 0)
    run.mkdir(parents=True, exist_ok=True)
    save_run_config(run, cfg)
    plan.save(run)
    return cfg, plan, spec


def test_3000_tasks_split_at_the_clusters_max_array_size_and_map_back(
    slurm_cluster, tmp_path, capsys
):
    run = tmp_path / "big"
    cfg, plan, spec = _touch_plan(run, 3000)
    paths = RunPaths(run)
    # MaxArraySize=1000 read from the cluster (scontrol show config): three arrays of 0-999.
    SlurmLauncher(cfg).launch(paths, plan, dry_run=True)
    printed = capsys.readouterr().out
    assert printed.count("#SBATCH --array=0-999\n") == 3, printed[-2000:]
    assert "EMBEDFLEET_TASK_OFFSET=2000" in printed and not load_submissions(run)
    # Running all 3000 (a process each) shows no more than their edges do: every other
    # task is marked complete first, so each array runs its first and last index and
    # every task must land on its own marker through the offset.
    edges = {0, 999, 1000, 1999, 2000, 2999}
    for t in sorted(set(range(3000)) - edges):
        marker = CompletionMarker(spec.name, t, 3000, spec.config_hash)
        write_marker(paths.storage, paths.marker(spec.stage_dir, t), marker)
    SlurmLauncher(cfg).launch(paths, plan)
    subs = load_submissions(run)
    assert [(s.offset, s.indices) for s in subs] == [(0, [0, 999]), (1000, [0, 999]),
                                                     (2000, [0, 999])]  # fmt: skip
    assert all("#SBATCH --array=0,999\n" in Path(s.script).read_text() for s in subs)
    deadline = time.time() + 600
    while len(completed_tasks(run, spec)) < 3000 and time.time() < deadline:
        time.sleep(1)
    assert len(completed_tasks(run, spec)) == 3000


def test_distributed_job_rendezvous_over_srun(slurm_cluster, tmp_path):
    run = tmp_path / "dist"
    cfg, plan, spec = _touch_plan(run, 1, DISTRIBUTED, world=2)
    SlurmLauncher(cfg).launch(RunPaths(run), plan)
    deadline = time.time() + 300
    while not completed_tasks(run, spec) and time.time() < deadline:
        time.sleep(1)
    assert json.loads((run / "touch" / "result.json").read_text()) == {"sum": 1.0, "world": 2}
    assert (run / "touch" / "logs" / "task_00000.rank1.log").exists()


def test_hostile_paths_and_names_run_the_intended_command(slurm_cluster, tmp_path):
    canary = tmp_path / "PWNED"
    hostile = tmp_path / f"we ird 'q\" $(touch {canary}) `touch {canary}`\nnext line"
    cfg, plan, spec = _touch_plan(hostile, 2)
    cfg.cluster.slurm.job_name_prefix = f"ef $(touch {canary}) 'x"
    cfg.cluster.env = {"EF_NOTE": f"; touch {canary} #\n$(touch {canary})"}
    SlurmLauncher(cfg).launch(RunPaths(hostile), plan)
    deadline = time.time() + 120
    while len(completed_tasks(hostile, spec)) < 2 and time.time() < deadline:
        time.sleep(1)
    assert completed_tasks(hostile, spec) == {0, 1}
    assert not canary.exists()
    script = next((hostile / "slurm").glob("*.sbatch")).read_text()
    # Exactly these directives, in this order: a value that smuggled in a line of its own
    # ("\n#SBATCH --wrap=...") would add one (sbatch reads every #SBATCH line up to the
    # first command, wherever it came from).
    name = job_name(cfg.cluster.slurm.job_name_prefix, hostile.name, "touch")
    assert [ln for ln in script.splitlines() if ln.lstrip().startswith("#SBATCH")] == [
        "#SBATCH --array=0-1",
        "#SBATCH --cpus-per-task=2",
        f"#SBATCH --job-name={shlex.quote(name)}",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=slurm-%A_%a.out",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR2@120",
        "#SBATCH --time=04:00:00",
    ]
    assert "\n" not in name and "PWNED" in name  # the hostile value is there, on its line


def test_dry_run_prints_scripts_and_submits_nothing(slurm_cluster, tmp_path):
    # Other tests may use the cluster meanwhile (make test runs them in parallel): what
    # must not appear is a job of this run, which its unique name would show.
    name = f"dry-{tmp_path.name}"
    args = [*SLICE, "cluster=slurm", f"run.root={tmp_path}", f"run.name={name}", "--dry-run"]
    proc = _ok(run_launch(*args))
    assert "#SBATCH --array=0-2" in proc.stdout and "# Run with: " in proc.stdout
    assert f"#SBATCH --job-name=ef-{name}-embed" in proc.stdout
    assert (
        "$ cd " in proc.stdout
        and "'--dependency=afterany:<embed-1>'" in proc.stdout
        and "merge: would submit 1 job" in proc.stdout
    )
    queued = sh("squeue", "-h", "-o", "%j")
    assert f"ef-{name}-" not in queued
    assert not sh(
        "sacct", "-X", "-n", "-P", "--name", f"ef-{name}-embed,ef-{name}-merge", "-o", "JobID"
    )
    assert not list(tmp_path.rglob("submissions.json"))


def test_multirun_submits_each_point_without_blocking_and_cancel(slurm_cluster, tmp_path):
    t0 = time.time()
    proc = _ok(
        run_launch(
            "-m",
            *SLICE[:-1],
            "dataset.limit=30,60",
            "cluster=slurm",
            f"run.root={tmp_path}",
            "run.name=sweep",
        )
    )
    assert time.time() - t0 < 120
    runs = sorted(p.parent.parent for p in tmp_path.glob("sweep/*/slurm/submissions.json"))
    assert len(runs) == 2, proc.stdout
    for run in runs:
        _ok(launch_cli("cancel", str(run)))
        ids = [s.job_id for s in load_submissions(run)]
        deadline = time.time() + 60
        while sh("squeue", "-h", "-j", ",".join(ids), check=False) and time.time() < deadline:
            time.sleep(1)
        assert not sh("squeue", "-h", "-j", ",".join(ids), check=False)
