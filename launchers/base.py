"""The launcher interface and the per-attempt records every launcher writes.

An attempt record ``<run_dir>/<stage_dir>/attempts/task_XXXXX.json`` says who ran the task
last (launcher, pid or job id, start, end, return code). Completion markers remain the
truth; attempts only let ``status`` tell failed from pending and find logs.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lib.fsio import atomic_write_json, read_json_or_none
from lib.pipeline import DISTRIBUTED, Plan, StageSpec

# Task commands run as `python -m jobs.<stage>` from the repository root.
REPO_ROOT = Path(__file__).resolve().parents[1]


def attempt_path(run_dir: Path, spec: StageSpec, task: int) -> Path:
    return Path(run_dir) / spec.stage_dir / "attempts" / f"task_{task:05d}.json"


def log_path(run_dir: Path, spec: StageSpec, task: int, rank: int = 0) -> Path:
    """A task's log; distributed stages have one per rank (``task_00000.rank3.log``)."""
    name = f"task_{task:05d}.rank{rank}.log" if spec.kind == DISTRIBUTED else f"task_{task:05d}.log"
    return Path(run_dir) / spec.stage_dir / "logs" / name


def write_attempt(run_dir: Path, spec: StageSpec, task: int, **fields: Any) -> None:
    path = attempt_path(run_dir, spec, task)
    record = read_attempt(run_dir, spec, task) or {}
    record.update(fields)
    atomic_write_json(path, record)


def read_attempt(run_dir: Path, spec: StageSpec, task: int) -> dict[str, Any] | None:
    return read_json_or_none(attempt_path(run_dir, spec, task))


@dataclass
class LaunchResult:
    complete: bool  # every stage finished (local) ; False if submitted and still running
    submitted: bool  # work was handed to a scheduler and is still running
    failed: dict[str, list[int]]  # stage -> failed tasks


class Launcher(ABC):
    """Turns a plan into running tasks. ``launch`` only runs tasks without a valid marker."""

    name = "base"

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def launch(self, run_dir: Path, plan: Plan, *, dry_run: bool = False) -> LaunchResult: ...

    def cancel(self, run_dir: Path, plan: Plan) -> int:
        """Stop every running task of the run; return how many were signalled."""
        return 0

    def now(self) -> float:
        return time.time()
