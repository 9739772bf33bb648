"""Submitting a 10,000-task stage: sbatch calls and wall time, embedfleet's SLURM launcher
vs a per-task sbatch loop vs submitit's map_array, on the test cluster, in one run.

Every job is submitted held (--hold) and cancelled right after, so only submission is
measured. sbatch calls are counted by a logging wrapper put first on PATH.

    .venv/bin/python bench/bench_submit.py [--tasks 10000] [--loop-tasks 10000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import machine, save
from cli.run import save_run_config
from launchers.slurm.launcher import SlurmLauncher
from launchers.slurm.queue import load_submissions, max_array_size
from lib.config.compose import compose
from lib.core.paths import RunPaths
from lib.plan.spec import ARRAY, Plan, StageSpec


def wrap_sbatch(bindir: Path, log: Path) -> None:
    real = shutil.which("sbatch")
    wrapper = bindir / "sbatch"
    wrapper.write_text(f'#!/bin/sh\necho x >> "{log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)


def calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


SUBMITTED: list[str] = []  # only our own jobs are cancelled, never anyone else's


def scancel_ours() -> None:
    ids = sorted(set(SUBMITTED))
    for i in range(0, len(ids), 500):
        subprocess.run(["scancel", *ids[i : i + 500]], capture_output=True)
    SUBMITTED.clear()


def ours(root: Path, n: int) -> float:
    hold = "+cluster.slurm.resources.default.additional_parameters.hold=true"
    cfg = compose(["+experiment=quickstart", "cluster=slurm", hold])
    run = root / "ours"
    cfg.run.root, cfg.run.name, cfg.run.dir = str(root), "ours", str(run)
    spec = StageSpec("touch", "embed", "tests.slurm.jobs.touch", "touch", ARRAY, n, "touch")
    plan = Plan([spec], 0)
    run.mkdir(parents=True)
    save_run_config(run, cfg)
    plan.save(run)
    t0 = time.perf_counter()
    SlurmLauncher(cfg).launch(RunPaths(run), plan)
    wall = time.perf_counter() - t0
    SUBMITTED.extend(s.job_id for s in load_submissions(run))
    assert sum(len(s.indices) for s in load_submissions(run)) == n
    return wall


def loop(n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        out = subprocess.run(
            ["sbatch", "--parsable", "--hold", "-o", "/dev/null", "--wrap", f"echo {i}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        SUBMITTED.append(out.strip().split(";")[0])
    return time.perf_counter() - t0


def with_submitit(root: Path, n: int, chunk: int) -> float:
    import submitit

    ex = submitit.AutoExecutor(folder=root / "submitit" / "%j", cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_additional_parameters={"hold": True})
    t0 = time.perf_counter()
    jobs = []
    for start in range(0, n, chunk):  # map_array of more than MaxArraySize is refused by sbatch
        jobs += ex.map_array(abs, list(range(start, min(n, start + chunk))))
    wall = time.perf_counter() - t0
    SUBMITTED.extend({str(j.job_id).split("_")[0] for j in jobs})
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tasks", type=int, default=10000)
    ap.add_argument("--loop-tasks", type=int, default=10000, help="tasks for the per-task loop")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="efbench-submit-"))
    bindir = root / "bin"
    bindir.mkdir()
    log = root / "sbatch.calls"
    wrap_sbatch(bindir, log)
    os.environ["PATH"] = f"{bindir}:{os.environ['PATH']}"
    size = max_array_size(None)
    res = {}
    try:
        for name, fn in (
            ("embedfleet", lambda: ours(root, args.tasks)),
            ("submitit map_array", lambda: with_submitit(root, args.tasks, size)),
            ("per-task sbatch loop", lambda: loop(args.loop_tasks)),
        ):
            before = calls(log)
            wall = fn()
            n = args.loop_tasks if name.startswith("per-task") else args.tasks
            res[name] = {
                "tasks": n,
                "seconds": wall,
                "sbatch_calls": calls(log) - before,
                "seconds_per_10k": wall * 10000 / n,
            }
            print(
                f"{name}: {n} tasks, {res[name]['sbatch_calls']} sbatch calls, {wall:.2f}s",
                flush=True,
            )
            scancel_ours()
    finally:
        scancel_ours()
        shutil.rmtree(root, ignore_errors=True)
    loop10k = res["per-task sbatch loop"]["seconds_per_10k"]
    ours10k = res["embedfleet"]["seconds_per_10k"]
    save("submit", {"max_array_size": size, "results": res, "speedup_vs_loop": loop10k / ours10k})
    print(f"\nmachine: {machine()}; MaxArraySize={size}\n")
    print("| method | tasks | sbatch calls | wall s | s per 10k tasks |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        print(
            f"| {name} | {r['tasks']} | {r['sbatch_calls']} | {r['seconds']:.2f} | {r['seconds_per_10k']:.1f} |"
        )
    print(
        f"\nembedfleet vs per-task loop: {loop10k / ours10k:.0f}x faster (goal >= 20x, <= 11 sbatch calls)"
    )


if __name__ == "__main__":
    main()
