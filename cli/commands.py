"""``launch.py status|wait|logs|retry|cancel|verify|search|report RUN_DIR``: watch and steer a
run (``search``: ``cli.search``; ``report``: ``cli.report``).

Exit codes: 0 done; 1 a task failed, or the command failed (its message on stderr); 2 bad
arguments (argparse); ``status`` exits 3 while tasks are still running or pending and
none failed, ``wait`` 1 when it stops waiting without every stage complete."""

from __future__ import annotations

import argparse
import sys
import time

from cli.argtypes import count, seconds
from cli.report import add_report_parser
from cli.run import resolve_run
from cli.search import add_search_parser
from cli.status import collect_status, exit_code, render_status
from cli.verify import cmd_verify
from launchers import get_launcher
from launchers.base import FAILED, PENDING, RUNNING
from lib.config.compose import load_run_config
from lib.config.redact import environ_secret_values, mask
from lib.core.errors import EmbedfleetError
from lib.core.locks import run_lock
from lib.core.paths import RunPaths
from lib.plan.spec import DISTRIBUTED, Plan


def _load(paths: RunPaths):
    cfg = load_run_config(paths)
    return cfg, Plan.load(paths), get_launcher(cfg)


def _report(paths: RunPaths, plan: Plan, launcher, statuses) -> str:
    """The status table, then what the launcher adds (its scheduler, its hosts)."""
    return "\n".join([render_status(paths, statuses), *launcher.status_notes(paths, plan)])


def cmd_status(args: argparse.Namespace) -> int:
    paths = resolve_run(args.run)
    _, plan, launcher = _load(paths)
    statuses = collect_status(paths, plan, launcher.scheduler_view(paths, plan))
    print(_report(paths, plan, launcher, statuses))
    return exit_code(statuses)


SCHEDULER_END_GRACE_S = 60.0


def cmd_wait(args: argparse.Namespace) -> int:
    """Until complete (0), or (1) a failure with nothing running, nothing running or
    pending, the timeout; where the launcher has a scheduler process of its own (hosts),
    while it lives (it retries and starts the next stages), and 1 once it is gone."""
    paths = resolve_run(args.run)
    _, plan, launcher = _load(paths)
    deadline = time.time() + args.timeout if args.timeout else None
    while True:
        alive = launcher.scheduler_alive(paths)
        statuses = collect_status(paths, plan, launcher.scheduler_view(paths, plan))
        if all(s.complete for s in statuses):
            # A scheduler of its own ends right after the last marker: let it (and release
            # the run lock, so the next launch is not refused), within a bound.
            grace = time.time() + SCHEDULER_END_GRACE_S
            while launcher.scheduler_alive(paths) and time.time() < grace:
                time.sleep(0.2)
            print(_report(paths, plan, launcher, statuses))
            return 0
        if alive is False:
            print(_report(paths, plan, launcher, statuses))
            return 1
        active = any(s.having(RUNNING) or s.having(PENDING) for s in statuses)
        failed = any(s.having(FAILED) for s in statuses)
        if alive is None and (
            (failed and not any(s.having(RUNNING) for s in statuses)) or not active
        ):
            print(_report(paths, plan, launcher, statuses))
            return 1
        if deadline and time.time() > deadline:
            print(_report(paths, plan, launcher, statuses))
            return 1
        time.sleep(args.interval)


def cmd_logs(args: argparse.Namespace) -> int:
    paths = resolve_run(args.run)
    spec = Plan.load(paths).stage(args.stage)
    if not 0 <= args.task < spec.num_tasks:
        raise EmbedfleetError(
            f"{args.stage} has {spec.num_tasks} task(s), numbered 0 to {spec.num_tasks - 1}: "
            f"there is no task {args.task}"
        )
    ranks = spec.world_size if spec.kind == DISTRIBUTED else 1
    if not 0 <= args.rank < ranks:
        raise EmbedfleetError(
            f"{args.stage} runs {ranks} rank(s) per task, numbered 0 to {ranks - 1}: there is "
            f"no rank {args.rank}"
        )
    name = spec.log(args.task, args.rank)
    # storage=sync or an object-store run dir on hosts: a running task's log is on its
    # host; the run dir's copy comes when it ends
    live = get_launcher(load_run_config(paths)).live_log(paths, spec, args.task, args.rank)
    if live is not None:
        print(f"# {args.stage} task {args.task}: the log on {live.source}", file=sys.stderr)
        text = live.data.decode(errors="replace")
    else:
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
    cfg, plan, launcher = _load(paths)
    # cluster=hosts|tpu_vm: detached unless asked now (run.yaml keeps an earlier --attach)
    cfg.cluster.multihost.attach = bool(args.attach)
    with run_lock(paths.storage, paths.launcher_lock, enabled=not args.dry_run) as lock:
        result = launcher.start(paths, plan, dry_run=args.dry_run, lock=lock)
    if result.interrupted is not None:
        return 130  # the launcher said what it stopped
    if result.failed:
        view = launcher.scheduler_view(paths, plan)
        print(render_status(paths, collect_status(paths, plan, view)), file=sys.stderr)
        return 1
    if result.submitted:
        print(f"submitted; watch with: python launch.py status {paths.root}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    paths = resolve_run(args.run)
    _, plan, launcher = _load(paths)
    n = launcher.cancel(paths, plan)
    print(f"cancelled {n} job(s)/process(es) of {paths.root}")
    return 0


RUN_HELP = "the run dir launch.py printed (a path or a URL), or run.name=NAME"
EXIT_HELP = "exit codes: 0 done; 1 a task failed or the command failed; 2 bad arguments"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python launch.py",
        description="Watch and steer a run. Start one with python launch.py +experiment=NAME.",
        epilog=f"{EXIT_HELP}. python launch.py COMMAND --help: one command's options.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name: str, summary: str, description: str, epilog: str = EXIT_HELP):
        return sub.add_parser(name, help=summary, description=description, epilog=epilog)

    s = add(
        "status",
        "per stage: tasks done/running/failed/pending",
        "Per stage: how many tasks are done (a valid completion marker), running, failed and "
        "pending, then each failed task with its reason and log.",
        "exit codes: 0 every stage complete; 1 a task failed (or the command failed); "
        "3 tasks still running or pending, none failed",
    )
    s.add_argument("run", help=RUN_HELP)
    s.set_defaults(fn=cmd_status)
    s = add(
        "wait",
        "block until the run completes or a task fails",
        "Poll the run's status until every stage is complete (exit 0), a task failed and "
        "nothing runs any more, nothing is running or pending, or --timeout passed (exit 1). "
        "cluster=hosts|tpu_vm: while its scheduler lives (it retries failed tasks and starts "
        "the next stages); exit 1 once it is gone without the run complete.",
    )
    s.add_argument("run", help=RUN_HELP)
    s.add_argument("--timeout", type=seconds, default=None, help="seconds (default: none)")
    s.add_argument(
        "--interval", type=seconds, default=10.0, help="seconds between polls (default: 10)"
    )
    s.set_defaults(fn=cmd_wait)
    s = add(
        "logs",
        "print a task's log",
        "Print the log of task TASK of stage STAGE (a stage name of the run's plan: embed, "
        "merge, kmeans_level1, ...), also while the task runs (cluster=hosts with "
        "storage=sync or an object-store run dir: read from the task's host, named on "
        "stderr).",
    )
    s.add_argument("run", help=RUN_HELP)
    s.add_argument("stage", help="a stage of the run's plan, e.g. embed, merge, kmeans_level1")
    s.add_argument("task", type=int, help="task index, 0 to the stage's task count - 1")
    s.add_argument(
        "--rank", type=count, default=0, help="rank of a distributed stage's task (default: 0)"
    )
    s.add_argument(
        "--tail", type=count, default=0, help="only the last N lines (default: 0, all of it)"
    )
    s.set_defaults(fn=cmd_logs)
    s = add(
        "retry",
        "rerun (resubmit) only tasks without a valid marker",
        "Relaunch the run from its run.yaml and plan.json: only tasks without a valid "
        "completion marker run again (secrets are read from the environment again).",
    )
    s.add_argument("run", help=RUN_HELP)
    s.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    s.add_argument(
        "--attach",
        action="store_true",
        help="cluster=hosts|tpu_vm: schedule in the foreground, streaming every task's log "
        "(default: a detached scheduler; launch.py returns once tasks run)",
    )
    s.set_defaults(fn=cmd_retry)
    s = add(
        "cancel",
        "stop every running task / job of the run",
        "Stop every running task (local processes) or job (SLURM, submitit) of the run; "
        "cluster=hosts|tpu_vm: its scheduler first, then the process groups on every host.",
    )
    s.add_argument("run", help=RUN_HELP)
    s.set_defaults(fn=cmd_cancel)
    s = add(
        "verify",
        "re-hash every output of every marker; invalidate the ones that do not match",
        "Re-hash every output named by every completion marker of the plan; a marker whose "
        "outputs do not match is invalidated (moved aside with the reason), so the next "
        "launch redoes that task.",
        "exit codes: 0 every output matches; 1 a marker was invalidated (or the command "
        "failed); 2 bad arguments",
    )
    s.add_argument("run", help=RUN_HELP)
    s.set_defaults(fn=cmd_verify)
    add_search_parser(add, RUN_HELP)
    add_report_parser(add, RUN_HELP)
    return p


def run_subcommand(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except EmbedfleetError as exc:
        print(f"error: {mask(str(exc), environ_secret_values())}", file=sys.stderr)
        return 1
