"""The work behind ``launch.py``: validate, plan, save the run, launch, summarise; and the
``status``/``wait``/``logs``/``retry``/``cancel`` subcommands."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from launchers import get_launcher
from launchers.base import log_path
from launchers.status import FAILED, PENDING, RUNNING, collect_status, render_status
from lib.config import (
    REDACTED,
    config_digest,
    load_run_config,
    redact,
    register_configs,
    to_plain,
    valid_keys,
)
from lib.errors import DatasetError, EmbedfleetError
from lib.fsio import atomic_write_bytes, check_writable
from lib.markers import ConfigMismatchError
from lib.pipeline import RUN_CONFIG_FILE, Plan, build_plan, completed_tasks

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


# ---------------------------------------------------------------------------------------
# Config validation with actionable messages


def _messages(exc: BaseException) -> list[str]:
    out = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        msg = str(exc).strip()
        # omegaconf chains a templated copy of its message ('$VALUE'); show it once.
        if msg and msg not in out and "$VALUE" not in msg and not re.fullmatch(r"'[^']*'", msg):
            out.append(msg)
        exc = exc.__cause__ or exc.__context__
    return out


def explain_config_error(exc: BaseException) -> str:
    """The error's messages plus, for an unknown key, the valid keys at that level."""
    text = "\n".join(_messages(exc))
    lines = [f"config error: {text}"]
    m = re.search(r"full_key: ([\w.\[\]]+)", text)
    if m:
        key = m.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        keys = valid_keys(parent)
        if keys and key.rsplit(".", 1)[-1] not in keys:
            where = parent or "the top level"
            lines.append(f"valid keys under {where}: {', '.join(keys)}")
    return "\n".join(lines)


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="launch"):
        return hydra_compose("config", overrides=overrides)


def prevalidate(overrides: list[str]) -> str | None:
    """Compose the config once, before Hydra runs (and creates the run dir); return an
    explanation if it fails or the run dir cannot be written."""
    try:
        cfg = compose(overrides)
        run_dir = Path(cfg.run.root).expanduser() / cfg.run.name
    except Exception as exc:
        return explain_config_error(exc)
    try:
        check_writable(run_dir)
    except PermissionError as exc:
        return f"error: {exc}"
    return None


# ---------------------------------------------------------------------------------------
# Launch


def _absolutize(cfg: DictConfig) -> None:
    """Make user paths absolute, so tasks started elsewhere (or from REPO) read the same."""
    cfg.run.root = str(Path(cfg.run.root).expanduser().absolute())
    p = cfg.dataset.path
    if p and "://" not in p and not p.startswith("builtin:") and os.path.exists(p):
        cfg.dataset.path = str(Path(p).absolute())
    mp = cfg.model.path
    if mp and not mp.startswith("pkg:") and Path(mp).expanduser().exists():
        cfg.model.path = str(Path(mp).expanduser().absolute())
    if cfg.merge.legacy_dir:
        cfg.merge.legacy_dir = str(Path(cfg.merge.legacy_dir).expanduser().absolute())


def _flatten(obj, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def _config_changes(old_yaml: Path, cfg: DictConfig) -> list[str]:
    if not old_yaml.exists():
        return []
    old = _flatten(OmegaConf.to_container(OmegaConf.load(old_yaml), resolve=False))
    new = _flatten(redact(to_plain(cfg)))
    keys = sorted(k for k in set(old) | set(new) if not k.startswith(("cluster.", "run.")))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def dataset_row_count(cfg: DictConfig, dry_run: bool = False) -> int:
    """Rows to embed. A dry run may plan from ``dataset.expected_rows`` when the dataset
    is not reachable from this machine (e.g. planning a cluster run on a laptop)."""
    if "embed" not in cfg.stages:
        return 0
    from lib.embed_shard import check_dataset, open_dataset

    try:
        return check_dataset(open_dataset(cfg), cfg)
    except DatasetError as exc:
        sizes = [v for v in (cfg.dataset.expected_rows, cfg.dataset.limit) if v is not None]
        if not dry_run or not sizes:
            raise
        print(
            f"warning: {exc}\nplanning for {min(sizes)} rows (dataset.expected_rows/limit)",
            file=sys.stderr,
        )
        return int(min(sizes))


def save_run_config(run_dir: Path, cfg: DictConfig) -> None:
    text = OmegaConf.to_yaml(OmegaConf.create(redact(to_plain(cfg))))
    atomic_write_bytes(run_dir / RUN_CONFIG_FILE, text.encode())


def launch_run(cfg: DictConfig, *, dry_run: bool, started: float) -> int:
    """Plan and launch ``cfg``. Returns a process exit code."""
    try:
        run_dir = Path(cfg.run.dir).absolute()
        cfg.run.dir = str(run_dir)
        _absolutize(cfg)
        if not dry_run:
            check_writable(run_dir)
        rows = dataset_row_count(cfg, dry_run)
        if "embed" in cfg.stages:
            from lib.models import resolve_model_path

            try:
                resolve_model_path(cfg.model.path)
            except EmbedfleetError as exc:
                if not dry_run:
                    raise
                print(f"warning: {exc}", file=sys.stderr)
        plan = build_plan(cfg, rows)
        try:
            for spec in plan.stages:
                completed_tasks(run_dir, spec)
        except ConfigMismatchError as exc:
            changes = _config_changes(run_dir / RUN_CONFIG_FILE, cfg)
            detail = ("\nchanged since that run:\n  " + "\n  ".join(changes)) if changes else ""
            raise ConfigMismatchError(f"{exc}{detail}") from None
        plan.extra["config_digest"] = config_digest([s.config_hash for s in plan.stages])
        if not dry_run:
            save_run_config(run_dir, cfg)
            plan.save(run_dir)
        launcher = get_launcher(cfg)
        print(f"embedfleet: {cfg.description or cfg.run.name}")
        print(f"run dir: {run_dir}")
        result = launcher.launch(run_dir, plan, dry_run=dry_run)
    except EmbedfleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if dry_run:
        print("dry run: nothing was run or submitted")
        return 0
    if result.failed:
        stage, tasks = next(iter(result.failed.items()))
        print(
            f"\n{stage}: {len(tasks)} task(s) failed. See `python launch.py status {run_dir}` and "
            f"`python launch.py logs {run_dir} {stage} {tasks[0]}`; rerun the same command "
            "(or `launch.py retry RUN_DIR`) to redo only the missing tasks.",
            file=sys.stderr,
        )
        return 1
    if result.submitted:
        print(f"submitted; watch with: python launch.py status {run_dir}")
        return 0
    print_summary(run_dir, plan, time.time() - started)
    return 0


def print_summary(run_dir: Path, plan: Plan, seconds: float) -> None:
    print(f"\ncomplete in {seconds:.1f}s: {run_dir}")
    report_path = run_dir / "merge" / "quality_report.json"
    if report_path.exists():
        r = json.loads(report_path.read_text())
        n = r["l2_norm"]
        print(
            f"  embeddings     {run_dir / 'merge' / r['files'][0]}  ({r['shape'][0]} x {r['shape'][1]} {r['dtype']})"
        )
        print(f"  metadata       {run_dir / 'merge' / 'metadata.parquet'}")
        print(
            f"  dropped rows   {r.get('rows_dropped', 0)}  ({run_dir / 'merge' / 'dropped_rows.parquet'})"
        )
        if "by_source" in r:
            print(
                f"  by source      {len(r['by_source'])} sources under {run_dir / 'merge' / 'by_source'}"
            )
        print(
            f"  L2 norms       min {n['min']:.4f}  max {n['max']:.4f}  mean {n['mean']:.4f}  std {n['std']:.2e}"
        )
        print(f"  quality report {report_path}")
    from lib.kmeans_stages import curation_summary

    for line in curation_summary(run_dir, [s.name for s in plan.stages]):
        print(line)
    print(f"  status         python launch.py status {run_dir}")


# ---------------------------------------------------------------------------------------
# Subcommands


def resolve_run_dir(arg: str) -> Path:
    p = Path(arg)
    if (p / RUN_CONFIG_FILE).exists():
        return p.absolute()
    if "=" in arg:
        cfg = compose([arg])
        return Path(cfg.run.root).absolute() / cfg.run.name
    raise EmbedfleetError(
        f"{arg} is not a run dir (no {RUN_CONFIG_FILE}); pass the directory launch.py printed"
    )


def _load(run_dir: Path) -> tuple[DictConfig, Plan]:
    cfg = load_run_config(run_dir / RUN_CONFIG_FILE)
    return cfg, Plan.load(run_dir)


def _scheduler_view(cfg: DictConfig, run_dir: Path, plan: Plan):
    launcher = get_launcher(cfg)
    view = getattr(launcher, "scheduler_view", None)
    return view(run_dir, plan) if view else None


def cmd_status(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args.run)
    cfg, plan = _load(run_dir)
    statuses = collect_status(run_dir, plan, _scheduler_view(cfg, run_dir, plan))
    print(render_status(run_dir, statuses))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args.run)
    cfg, plan = _load(run_dir)
    deadline = time.time() + args.timeout if args.timeout else None
    while True:
        statuses = collect_status(run_dir, plan, _scheduler_view(cfg, run_dir, plan))
        if all(s.complete for s in statuses):
            print(render_status(run_dir, statuses))
            return 0
        active = any(s.having(RUNNING) or s.having(PENDING) for s in statuses)
        if any(s.having(FAILED) for s in statuses) and not any(s.having(RUNNING) for s in statuses):
            print(render_status(run_dir, statuses))
            return 1
        if not active or (deadline and time.time() > deadline):
            print(render_status(run_dir, statuses))
            return 1
        time.sleep(args.interval)


def cmd_logs(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args.run)
    _, plan = _load(run_dir)
    spec = plan.stage(args.stage)
    path = log_path(run_dir, spec, args.task, args.rank)
    if not path.exists():
        raise EmbedfleetError(f"no log yet for {args.stage} task {args.task}: {path}")
    lines = path.read_text(errors="replace").splitlines()
    for line in lines[-args.tail :] if args.tail else lines:
        print(line)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args.run)
    cfg, plan = _load(run_dir)
    result = get_launcher(cfg).launch(run_dir, plan, dry_run=args.dry_run)
    if result.failed:
        print(render_status(run_dir, collect_status(run_dir, plan)), file=sys.stderr)
        return 1
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args.run)
    cfg, plan = _load(run_dir)
    n = get_launcher(cfg).cancel(run_dir, plan)
    print(f"cancelled {n} job(s)/process(es) of {run_dir}")
    return 0


def run_subcommand(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python launch.py", description="Watch and steer a run.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="per stage: tasks done/running/failed/pending")
    s.add_argument("run", help="run dir (printed by launch.py)")
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
    args = p.parse_args(argv)
    try:
        return int(args.fn(args))
    except EmbedfleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


__all__ = ["REDACTED", "launch_run", "prevalidate", "run_subcommand"]
