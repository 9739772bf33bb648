"""What a run's tasks are doing: done / running / failed / pending, and where their logs are.

Completion markers decide "done" (read through ``RunPaths``, one listing per stage); the
launcher's ``scheduler_view`` (its attempt records, or one batched query of its scheduler)
tells running from failed from pending.

Per stage it also shows what its finished tasks' markers recorded (``lib.core.usage``):
the largest peak RSS of a task (its own or a finished child process's), the largest peak
CUDA memory, and the CPU seconds of all tasks together; ``-`` where no marker has them
(markers written before they were recorded, or nothing finished).

``launch.py status`` exits with ``exit_code``: 0 when every stage is complete, 1 when a
task failed (or the command itself failed, with a message), 3 when tasks are still
running or pending and none failed.
"""

from __future__ import annotations

import json
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
    peak_rss_bytes: int | None = None  # the largest of its finished tasks' (own or children)
    peak_cuda_bytes: int | None = None
    cpu_seconds: float | None = None  # summed over its finished tasks

    def add_usage(self, marker: dict) -> None:
        """Fold one finished task's marker (parsed JSON) into the stage's figures."""
        rss = [marker.get(k) for k in ("peak_rss_bytes", "peak_rss_children_bytes")]
        rss = [int(v) for v in rss if isinstance(v, int | float)]
        if rss:
            self.peak_rss_bytes = max([*rss, self.peak_rss_bytes or 0])
        cuda = marker.get("peak_cuda_bytes")
        if isinstance(cuda, int | float):
            self.peak_cuda_bytes = max(int(cuda), self.peak_cuda_bytes or 0)
        cpu = marker.get("cpu_seconds")
        if isinstance(cpu, int | float):
            self.cpu_seconds = (self.cpu_seconds or 0.0) + float(cpu)

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
        names = [paths.marker(spec.stage_dir, t) for t in sorted(done)]
        for blob in paths.storage.read_many(names).values():
            try:
                st.add_usage(json.loads(blob))
            except (ValueError, AttributeError):
                continue  # a marker rewritten since: counted as done, its figures skipped
        out.append(st)
    return out


def human_bytes(n: int | None) -> str:
    """``1.5G``, ``312M``, ``-`` for None."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return (
                f"{value:.0f}{unit}" if unit in ("B", "K") or value >= 100 else f"{value:.1f}{unit}"
            )
        value /= 1024
    return f"{value:.1f}T"


def _seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.1f}"


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
        f"{'stage':<18}{'tasks':>7}{'done':>7}{'running':>9}{'failed':>8}{'pending':>9}"
        f"{'peak rss':>10}{'gpu mem':>9}{'cpu s':>9}",
    ]
    for st in statuses:
        lines.append(
            f"{st.spec.name:<18}{st.spec.num_tasks:>7}{len(st.having(DONE)):>7}"
            f"{len(st.having(RUNNING)):>9}{len(st.having(FAILED)):>8}{len(st.having(PENDING)):>9}"
            f"{human_bytes(st.peak_rss_bytes):>10}{human_bytes(st.peak_cuda_bytes):>9}"
            f"{_seconds(st.cpu_seconds):>9}"
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
