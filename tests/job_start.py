"""What every tiny test job (tests/unit/launchers/*_job.py, tests/hosts/*_job.py,
tests/slurm/jobs/) starts with: the launchers' ``--run-dir``/``--stage`` arguments, the
task's identity from its environment, its run dir."""

from __future__ import annotations

import argparse

from lib.core.paths import RunPaths
from lib.runtime.environment import current_environment
from lib.runtime.identity import TaskIdentity


def job_start() -> tuple[argparse.Namespace, TaskIdentity, RunPaths]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--stage", required=True)
    args = ap.parse_args()
    ident = current_environment().identity(args.stage, run_dir=args.run_dir)
    return args, ident, RunPaths(args.run_dir)
