"""What a run's tasks are doing: done / running / failed / pending, and where their logs are.

Completion markers decide "done" (read through ``RunPaths``, one listing per stage); the
launcher's ``scheduler_view`` (its attempt records, or one batched query of its scheduler)
tells running from failed from pending.

``launch.py status`` exits with ``exit_code``: 0 when every stage is complete, 1 when a
task failed (or the command itself failed, with a message), 3 when tasks are still
running or pending and none failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launchers.base import DONE, FAILED, PENDING, RUNNING, SchedulerView
from lib.core.paths import RunPaths
from lib.core.sharding import compress_indices
from lib.plan.spec import Plan, StageSpec, completed_tasks


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


def collect_status(paths: RunPaths, plan: Plan, view: SchedulerView) -> list[StageStatus]:
    """Status of every task: done from its marker, otherwise what ``view`` says (pending
    when it says nothing)."""
    out = []
    for spec in plan.stages:
        st = StageStatus(spec)
        done = completed_tasks(paths, spec)
        for task in range(spec.num_tasks):
            if task in done:
                st.tasks[task] = DONE
                continue
            state, detail = view.get((spec.name, task), (PENDING, ""))
            st.tasks[task] = state
            if detail:
                st.details[task] = detail
        out.append(st)
    return out


EXIT_COMPLETE, EXIT_FAILED, EXIT_UNFINISHED = 0, 1, 3


def exit_code(statuses: list[StageStatus]) -> int:
    """What ``status`` exits with (see the module doc): a failure wins over unfinished."""
    if any(st.having(FAILED) for st in statuses):
        return EXIT_FAILED
    return EXIT_COMPLETE if all(st.complete for st in statuses) else EXIT_UNFINISHED


def render_status(paths: RunPaths, statuses: list[StageStatus]) -> str:
    """A plain-text table (one line per stage) plus the failed tasks and their logs."""
    lines = [
        f"run: {paths.root}",
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
                lines.append(f"  task {t}: {why}; log {paths.url(st.spec.log(t))}")
    if all(st.complete for st in statuses):
        lines.append("all stages complete")
    return "\n".join(lines)
