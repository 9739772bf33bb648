"""What a run's tasks are doing: done / running / failed / pending, and where their logs are.

Completion markers decide "done"; attempt records (and, for schedulers, one batched query
by the launcher) tell running from failed from pending.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from launchers.base import log_path, read_attempt
from lib.pipeline import Plan, StageSpec, completed_tasks
from lib.sharding import compress_indices

DONE, RUNNING, FAILED, PENDING = "done", "running", "failed", "pending"


@dataclass
class StageStatus:
    spec: StageSpec
    tasks: dict[int, str] = field(default_factory=dict)
    details: dict[int, str] = field(default_factory=dict)

    def having(self, state: str) -> list[int]:
        return sorted(t for t, s in self.tasks.items() if s == state)

    @property
    def complete(self) -> bool:
        return len(self.having(DONE)) == self.spec.num_tasks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_attempt_state(rec: dict) -> tuple[str, str]:
    """State from a local attempt record: running if a pid lives on this host."""
    if rec.get("ended"):
        code = rec.get("returncode")
        return (FAILED, f"exit code {code}") if code else (PENDING, "exited 0 without marker")
    if rec.get("host") == socket.gethostname() and any(_pid_alive(p) for p in rec.get("pids", [])):
        return RUNNING, f"pid {rec['pids'][0]}"
    return FAILED, "process vanished without a marker"


def collect_status(
    run_dir: Path, plan: Plan, scheduler: dict[tuple[str, int], tuple[str, str]] | None = None
) -> list[StageStatus]:
    """Status of every task. ``scheduler`` maps (stage, task) -> (state, detail) when a
    launcher has queried its scheduler; otherwise attempt records are used."""
    out = []
    for spec in plan.stages:
        st = StageStatus(spec)
        done = completed_tasks(run_dir, spec)
        for task in range(spec.num_tasks):
            if task in done:
                st.tasks[task] = DONE
                continue
            if scheduler and (spec.name, task) in scheduler:
                state, detail = scheduler[(spec.name, task)]
            else:
                rec = read_attempt(run_dir, spec, task)
                state, detail = (PENDING, "") if rec is None else local_attempt_state(rec)
            st.tasks[task] = state
            if detail:
                st.details[task] = detail
        out.append(st)
    return out


def render_status(run_dir: Path, statuses: list[StageStatus]) -> str:
    """A plain-text table (one line per stage) plus the failed tasks and their logs."""
    lines = [
        f"run: {run_dir}",
        f"{'stage':<18}{'tasks':>7}{'done':>7}{'running':>9}{'failed':>8}{'pending':>9}",
    ]
    for st in statuses:
        lines.append(
            f"{st.spec.name:<18}{st.spec.num_tasks:>7}{len(st.having(DONE)):>7}"
            f"{len(st.having(RUNNING)):>9}{len(st.having(FAILED)):>8}{len(st.having(PENDING)):>9}"
        )
    for st in statuses:
        failed = st.having(FAILED)
        if failed:
            lines.append(f"failed {st.spec.name} tasks {compress_indices(failed)}:")
            for t in failed[:10]:
                why = st.details.get(t, "")
                lines.append(f"  task {t}: {why}; log {log_path(run_dir, st.spec, t)}")
    if all(st.complete for st in statuses):
        lines.append("all stages complete")
    return "\n".join(lines)
