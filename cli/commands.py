"""``launch.py status|wait|logs|retry|cancel|verify RUN_DIR``: watch and steer a run."""

from __future__ import annotations

import argparse
import sys
import time

from cli.run import resolve_run
from cli.status import collect_status, render_status
from cli.verify import cmd_verify
from launchers import get_launcher
from launchers.base import FAILED, PENDING, RUNNING
from lib.config.compose import load_run_config
from lib.core.errors import EmbedfleetError
from lib.core.locks import run_lock
from lib.core.paths import RunPaths
from lib.plan.spec import Plan
from lib.config.redact import environ_secret_values, mask


def _load(paths: RunPaths):
    cfg = load_run_config(paths)
    return cfg, Plan.load(paths), get_launcher(cfg)


def _statuses(paths: RunPaths):
    _, plan, launcher = _load(paths)
    return collect_status(paths, plan, launcher.scheduler_view(paths, plan))


def cmd_status(args: argparse.Namespace) -> int:
    paths = resolve_run(args.run)
    print(render_status(paths, _statuses(paths)))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    paths = resolve_run(args.run)
    deadline = time.time() + args.timeout if args.timeout else None
    while True:
        statuses = _statuses(paths)
        if all(s.complete for s in statuses):
            print(render_status(paths, statuses))
            return 0
        active = any(s.having(RUNNING) or s.having(PENDING) for s in statuses)
        if any(s.having(FAILED) for s in statuses) and not any(s.having(RUNNING) for s in statuses):
            print(render_status(paths, statuses))
            return 1
        if not active or (deadline and time.time() > deadline):
            print(render_status(paths, statuses))
            return 1
        time.sleep(args.interval)


def cmd_logs(args: argparse.Namespace) -> int:
    paths = resolve_run(args.run)
    spec = Plan.load(paths).stage(args.stage)
    name = spec.log(args.task, args.rank)
    try:
        text = paths.storage.read_text(name)
    except FileNotFoundError:
        local = paths.storage.local_file(name)  # a task still running on this machine
        if not local.exists():
            raise EmbedfleetError(
                f"no log yet for {args.stage} task {args.task}: {paths.url(name)}"
            ) from None
        text = local.read_text(errors="replace")
    lines = text.splitlines()
    for line in lines[-args.tail :] if args.tail else lines:
        print(line)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    paths = resolve_run(args.run)
    _, plan, launcher = _load(paths)
    with run_lock(paths.storage, paths.launcher_lock, enabled=not args.dry_run):
        result = launcher.launch(paths, plan, dry_run=args.dry_run)
    if result.interrupted is not None:
        return 130  # the launcher said what it stopped
    if result.failed:
        view = launcher.scheduler_view(paths, plan)
        print(render_status(paths, collect_status(paths, plan, view)), file=sys.stderr)
        return 1
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    paths = resolve_run(args.run)
    _, plan, launcher = _load(paths)
    n = launcher.cancel(paths, plan)
    print(f"cancelled {n} job(s)/process(es) of {paths.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch.py", description="Watch and steer a run.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="per stage: tasks done/running/failed/pending")
    s.add_argument("run", help="run dir (printed by launch.py), a path or a URL")
    s.set_defaults(fn=cmd_status)
    s = sub.add_parser("wait", help="block until the run completes or a task fails")
    s.add_argument("run")
    s.add_argument("--timeout", type=float, default=None, help="seconds (default: none)")
    s.add_argument("--interval", type=float, default=10.0, help="seconds between polls")
    s.set_defaults(fn=cmd_wait)
    s = sub.add_parser("logs", help="print a task's log")
    s.add_argument("run")
    s.add_argument("stage")
    s.add_argument("task", type=int)
    s.add_argument("--rank", type=int, default=0)
    s.add_argument("--tail", type=int, default=0, help="only the last N lines")
    s.set_defaults(fn=cmd_logs)
    s = sub.add_parser("retry", help="rerun (resubmit) only tasks without a valid marker")
    s.add_argument("run")
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(fn=cmd_retry)
    s = sub.add_parser("cancel", help="stop every running task / job of the run")
    s.add_argument("run")
    s.set_defaults(fn=cmd_cancel)
    s = sub.add_parser(
        "verify",
        help="re-hash every output of every marker; invalidate the ones that do not match",
    )
    s.add_argument("run")
    s.set_defaults(fn=cmd_verify)
    return p


def run_subcommand(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except EmbedfleetError as exc:
        print(f"error: {mask(str(exc), environ_secret_values())}", file=sys.stderr)
        return 1
