"""``launch.py verify RUN_DIR``: re-hash every output of every marker of the run's plan.

Task markers (``<stage dir>/completions/task_XXXXX.json``) and checkpoint markers (an
embed shard's finished parts, a k-means level's steps) alike: each output must exist with
the size and sha256 its marker recorded. A marker that no longer matches is invalidated
(``lib.core.markers.reject_marker``: moved to ``completions/invalid/`` with the reason),
so the next launch or ``retry`` redoes that task. Prints a summary per stage; exits 1 if
any marker was broken, 0 if every one matched.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field

from cli.run import resolve_run
from lib.core.errors import InvalidMarkerError
from lib.core.markers import CompletionMarker, output_problems, parse_marker, reject_marker
from lib.core.paths import RunPaths
from lib.core.progress import Progress
from lib.plan.spec import Plan, StageSpec

log = logging.getLogger("embedfleet.verify")


@dataclass
class StageReport:
    stage: str
    ok: int = 0
    missing: int = 0  # tasks of the plan without a marker (not broken: not done yet)
    broken: list[str] = field(default_factory=list)  # one line per invalidated marker
    foreign: list[str] = field(default_factory=list)  # another configuration's, left alone

    def line(self) -> str:
        parts = [f"{self.ok} ok"]
        if self.broken:
            parts.append(f"{len(self.broken)} invalidated")
        if self.foreign:
            parts.append(f"{len(self.foreign)} of another configuration")
        if self.missing:
            parts.append(f"{self.missing} task(s) without a marker")
        return f"{self.stage:<16} " + ", ".join(parts)


def _markers(paths: RunPaths, spec: StageSpec) -> tuple[dict[str, int], list[str]]:
    listing = paths.storage.list(spec.stage_dir)
    return listing, sorted(n for n in listing if RunPaths.is_marker(n))


def verify_stage(
    paths: RunPaths, spec: StageSpec, listing: dict[str, int], names: list[str], progress: Progress
) -> StageReport:
    """Check every marker ``names`` of ``spec`` (task and checkpoint markers)."""
    storage = paths.storage
    report = StageReport(spec.name)
    tasks = {paths.marker(spec.stage_dir, t) for t in range(spec.num_tasks)}
    report.missing = len(tasks - set(listing))
    for name in names:
        try:
            blob = storage.read_bytes(name)
        except FileNotFoundError:  # moved aside with a marker naming the same file
            report.broken.append(f"{name}: invalidated with the marker above (same files)")
            continue
        try:
            marker: CompletionMarker = parse_marker(blob, storage.url(name))
        except InvalidMarkerError as exc:
            report.broken.append(f"{name}: " + reject_marker(storage, name, None, {name: str(exc)}))
            continue
        if name in tasks and marker.config_hash != spec.config_hash:
            # Not this run's configuration: an error the launch reports; verify leaves it.
            report.foreign.append(
                f"{name}: written under config hash {marker.config_hash[:12]}, the plan's is "
                f"{spec.config_hash[:12]} (left in place; a launch says what changed)"
            )
            continue
        problems = output_problems(storage, marker, sizes=listing, on_bytes=progress.update)
        if problems:
            report.broken.append(f"{name}: " + reject_marker(storage, name, marker, problems))
        else:
            report.ok += 1
    return report


def verify_run(paths: RunPaths, plan: Plan) -> list[StageReport]:
    """Verify every stage of ``plan`` in ``paths``; print the summary; return the reports."""
    found = {spec.name: _markers(paths, spec) for spec in plan.stages}
    total = 0
    for _, names in found.values():
        for blob in paths.storage.read_many(names).values():
            try:
                total += sum(o.bytes for o in parse_marker(blob, "").outputs)
            except InvalidMarkerError:
                continue
    progress = Progress(total, "verify", log, unit="B")
    try:
        reports = [verify_stage(paths, spec, *found[spec.name], progress) for spec in plan.stages]
    finally:
        progress.close()
    for report in reports:
        print(report.line())
        for line in report.broken + report.foreign:
            print(f"  {line}")
    return reports


def cmd_verify(args: argparse.Namespace) -> int:
    paths = resolve_run(args.run)
    if not log.handlers:  # off a terminal, Progress reports every 10 s through this logger
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    reports = verify_run(paths, Plan.load(paths))
    checked = sum(r.ok + len(r.broken) + len(r.foreign) for r in reports)
    broken = sum(len(r.broken) + len(r.foreign) for r in reports)
    if broken:
        print(
            f"verify: {broken} of {checked} marker(s) did not match their outputs; rerun the "
            f"same command (or `python launch.py retry {paths.root}`) to redo those tasks"
        )
        return 1
    missing = sum(r.missing for r in reports)
    todo = f"; {missing} task(s) have no marker yet (launch or retry runs them)" if missing else ""
    print(f"verify: all {checked} marker(s) of {paths.root} match their outputs{todo}")
    return 0
