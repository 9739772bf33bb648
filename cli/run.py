"""What ``launch.py`` does with a composed config: validate it, count the rows, plan the
stages, save ``run.yaml`` and ``plan.json`` in the run dir, hand the plan to the launcher,
and print the end-of-run summary."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cli.summary import print_summary
from cli.upstream import check_merge_inputs, check_upstream_complete, upstream_stages
from launchers import get_launcher
from lib.config.compose import compose, explain_config_error
from lib.config.fields import to_plain
from lib.config.redact import (
    check_no_secret_outside_env,
    config_secret_values,
    environ_secret_values,
    mask,
    redact,
)
from lib.core.errors import ConfigMismatchError, DatasetError, EmbedfleetError
from lib.core.hashing import config_digest
from lib.core.locks import run_lock
from lib.core.paths import RunPaths
from lib.core.storage import is_url, join
from lib.plan.registry import before_launch, build_plan
from lib.plan.spec import Plan, StageSpec, completed_tasks


def prevalidate(overrides: list[str]) -> str | None:
    """Compose the config once, before Hydra runs (and creates the run dir); return an
    explanation if it fails or the run dir cannot be written."""
    try:
        cfg = compose(overrides)
        paths = RunPaths(str(cfg.run.dir))
    except Exception as exc:
        return explain_config_error(exc)
    try:
        paths.storage.check_writable()
    except (PermissionError, EmbedfleetError) as exc:
        return f"error: {exc}"
    return None


def _absolutize(cfg: DictConfig) -> None:
    """Make user paths absolute, so tasks started elsewhere (or from the repo) read the same."""
    if not is_url(str(cfg.run.root)):
        cfg.run.root = str(Path(cfg.run.root).expanduser().absolute())

    def dataset_path(p: str) -> str:
        local = p and "://" not in p and not p.startswith("builtin:")
        # a file, a directory or a glob of files
        if local and (os.path.exists(p) or any(c in p for c in "*?[")):
            return str(Path(p).absolute())
        return p

    p = cfg.dataset.path
    if OmegaConf.is_list(p):
        cfg.dataset.path = [dataset_path(str(x)) for x in p]
    elif p:
        cfg.dataset.path = dataset_path(str(p))
    mp = cfg.model.path
    if mp and not mp.startswith("pkg:") and Path(mp).expanduser().exists():
        cfg.model.path = str(Path(mp).expanduser().absolute())
    for section, key in (
        ("merge", "legacy_dir"),
        ("merge", "metadata_path"),
        ("sync", "dest"),
        ("kmeans", "embeddings_path"),
    ):
        value = cfg[section][key]
        if value and not is_url(str(value)):
            cfg[section][key] = str(Path(value).expanduser().absolute())


def _flatten(obj, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


# What each stage's config hash covers (its plan module's ``build``), for the last resort of
# ``_config_changes``: a hash differs and neither run.yaml nor plan.json says why.
_HASHED = {
    "embed": "dataset.*, model.*, embed.* (less run-time settings) and the dataset's row count",
    "merge": "merge.* (less run-time settings) and the embed and sync stages' hashes",
    "kmeans": "the level's kmeans.* values and its input's hash (the merge stage's, "
    "kmeans.embeddings_path's path/shape/dtype, or level L-1's)",
    "curate": "curate.*, the number of k-means levels and the top level's hash",
    "metrics": "metrics.*, the level and its k-means level's hash",
    "index": "index.* (less run-time settings) and the merge stage's hash",
    "report": "the hashes of the stages planned before it (report.* is not hashed)",
    "extract": "dataset.*, extract.* (less run-time settings), the row count and the "
    "dataset's fingerprint",
}


def _config_changes(
    paths: RunPaths, cfg: DictConfig, plan: Plan | None = None, spec: StageSpec | None = None
) -> list[str]:
    """What differs between the run dir's last launch and this one: run.yaml's keys, then
    plan.json's row count, task counts and stage hashes; failing all, which hash of
    ``spec`` (the stage whose marker mismatched) differs and what it covers."""
    changes = []
    try:
        text = paths.storage.read_text(paths.run_config)
    except FileNotFoundError:
        text = None
    if text is not None:
        old = _flatten(OmegaConf.to_container(OmegaConf.create(text), resolve=False))
        new = _flatten(redact(to_plain(cfg)))
        keys = sorted(k for k in set(old) | set(new) if not k.startswith(("cluster.", "run.")))
        changes += [
            f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)
        ]
    if plan is None:
        return changes
    try:
        saved: Plan | None = Plan.load(paths)
    except (EmbedfleetError, ValueError, KeyError, TypeError):
        saved = None
    if saved is not None:
        if saved.dataset_rows != plan.dataset_rows:
            changes.append(
                f"dataset rows: {saved.dataset_rows} -> {plan.dataset_rows} (dataset.limit, or "
                f"the dataset {cfg.dataset.path} itself changed)"
            )
        before = {s.name: s for s in saved.stages}
        for now in plan.stages:
            was = before.get(now.name)
            if was is None:
                continue
            if was.num_tasks != now.num_tasks:
                changes.append(f"{now.name}: {was.num_tasks} task(s) -> {now.num_tasks}")
            if was.config_hash != now.config_hash:
                changes.append(
                    f"{now.name} config hash: {was.config_hash[:12]} -> {now.config_hash[:12]}"
                )
    if spec is not None and not changes:
        why = (
            "the run dir has no plan.json of the earlier launch to compare with"
            if saved is None
            else "although run.yaml and plan.json match this launch"
        )
        changes.append(
            f"{spec.name}: its markers carry config hash {_marker_hash(paths, spec)[:12]}, "
            f"this run's is {spec.config_hash[:12]}, {why}; that hash covers "
            f"{_HASHED.get(spec.group, spec.group)} (rows now: {plan.dataset_rows})"
        )
    return changes


def _marker_hash(paths: RunPaths, spec: StageSpec) -> str:
    """The config hash of the first marker of ``spec`` found (for messages)."""
    for task in range(spec.num_tasks):
        data = paths.storage.read_json(paths.marker(spec.stage_dir, task))
        if isinstance(data, dict) and data.get("config_hash"):
            return str(data["config_hash"])
    return "?"


def dataset_input(cfg: DictConfig, dry_run: bool = False):
    """The embed stage's input (``lib.embed.inputs.EmbedInput``: rows to embed, sample,
    files), None without an embed stage. A dry run may plan from
    ``dataset.expected_rows`` when the dataset is not reachable from this machine (e.g.
    planning a cluster run on a laptop)."""
    if "embed" not in cfg.stages:
        return None
    from lib.embed.inputs import EmbedInput, embed_input

    try:
        return embed_input(cfg)
    except DatasetError as exc:
        return EmbedInput(_declared_rows(cfg, exc, dry_run))


def _declared_rows(cfg: DictConfig, exc: DatasetError, dry_run: bool) -> int:
    """The row count a dry run plans from when the dataset cannot be read here
    (``dataset.expected_rows``/``limit``, with a warning); else ``exc`` is raised."""
    sizes = [v for v in (cfg.dataset.expected_rows, cfg.dataset.limit) if v is not None]
    if not dry_run or not sizes:
        raise exc
    print(
        f"warning: {exc}\nplanning for {min(sizes)} rows (dataset.expected_rows/limit)",
        file=sys.stderr,
    )
    return int(min(sizes))


def extract_rows(cfg: DictConfig, dry_run: bool = False) -> tuple[int, dict | None]:
    """Rows the extract stage reads when no embed stage counts them (as ``dataset_input``
    does: checked columns and size; a dry run may plan from ``dataset.expected_rows``),
    and a many-file dataset's record (``MultiSource.record()``, else None)."""
    from lib.data.columns import check_dataset, open_dataset
    from lib.data.datasets import MultiSource

    try:
        source = open_dataset(cfg)
        rows = check_dataset(source, cfg)
    except DatasetError as exc:
        return _declared_rows(cfg, exc, dry_run), None
    return rows, source.record() if isinstance(source, MultiSource) else None


def recorded_overrides(overrides: list[str]) -> list[str]:
    """The command-line overrides worth keeping in ``plan.json``: all but those carrying
    a secret (``lib.config.redact.secret_overrides``), which are never written."""
    from lib.config.redact import secret_overrides

    return [o for o in overrides if not secret_overrides([o])]


def save_run_config(paths: RunPaths | Path | str, cfg: DictConfig) -> None:
    """``run.yaml``: the resolved config with secret-looking values redacted."""
    paths = paths if isinstance(paths, RunPaths) else RunPaths(paths)
    text = OmegaConf.to_yaml(OmegaConf.create(redact(to_plain(cfg))))
    paths.storage.publish_bytes(paths.run_config, text.encode())


def launch_run(
    cfg: DictConfig,
    *,
    dry_run: bool,
    started: float,
    force_replan: bool = False,
    overrides: list[str] | None = None,
) -> int:
    """Plan and launch ``cfg``. Returns a process exit code. ``force_replan``: accept a
    changed input or config in an existing run dir and redo the stages it changes.
    ``overrides``: the command line's, kept in ``plan.json`` (``extra.overrides``, those
    carrying a secret left out) so a later command can say how to relaunch the run."""
    try:
        run_dir = str(cfg.run.dir)
        if not is_url(run_dir):
            run_dir = str(Path(run_dir).absolute())
        cfg.run.dir = run_dir
        _absolutize(cfg)
        check_no_secret_outside_env(to_plain(cfg))
        paths = RunPaths(run_dir)
        if not dry_run:
            paths.storage.check_writable()
        requested = [str(s) for s in cfg.stages]
        added = upstream_stages(cfg)  # planned as the first stage's inputs, must be complete
        cfg.stages = [*added, *requested]
        embed_input = dataset_input(cfg, dry_run)
        rows = embed_input.rows if embed_input is not None else 0
        files_record = None
        if embed_input is None and "extract" in cfg.stages:
            rows, files_record = extract_rows(cfg, dry_run)
        if "embed" in cfg.stages:
            from lib.compute.models import resolve_model_path
            from lib.embed.checks import check_max_length

            try:
                check_max_length(cfg.model, resolve_model_path(cfg.model.path))
            except EmbedfleetError as exc:
                if not dry_run:
                    raise
                print(f"warning: {exc}", file=sys.stderr)
        if "extract" in cfg.stages:
            from lib.extract.checks import check_extract_launch

            try:
                check_extract_launch(cfg)
            except EmbedfleetError as exc:
                if not dry_run:
                    raise
                print(f"warning: {exc}", file=sys.stderr)
        plan = build_plan(cfg, rows)
        if files_record is not None:
            from lib.data.datasets import FILES_RECORD_KEY

            plan.extra[FILES_RECORD_KEY] = files_record
        grown = False
        if plan.group("embed"):
            from lib.embed.append import appends, apply_append
            from lib.embed.checks import FINGERPRINT_KEY, check_input_unchanged
            from lib.embed.plan import input_fingerprint

            if embed_input is not None:
                embed_input.record(plan)
            if appends(cfg, paths) and not force_replan:
                grown = apply_append(cfg, paths, plan, rows)
                fingerprint = input_fingerprint(cfg)
            else:
                fingerprint = check_input_unchanged(cfg, paths, plan, force=force_replan)
            plan.extra[FINGERPRINT_KEY] = fingerprint
        if grown and not dry_run:
            from cli.replan import discard_changed_stages

            for line in discard_changed_stages(paths, plan):
                print(line.replace("--force-replan", "embed.append (the dataset grew)"))
        if force_replan and not dry_run:
            from cli.replan import discard_changed_stages

            for line in discard_changed_stages(paths, plan):
                print(line)
        try:
            for spec in plan.stages:
                completed_tasks(paths, spec)
        except ConfigMismatchError as exc:
            changes = _config_changes(paths, cfg, plan, spec)
            detail = ("\nchanged since that run:\n  " + "\n  ".join(changes)) if changes else ""
            raise ConfigMismatchError(f"{exc}{detail}") from None
        check_upstream_complete(paths, plan, added, requested)
        check_merge_inputs(cfg, paths, requested)
        plan.extra["config_digest"] = config_digest([s.config_hash for s in plan.stages])
        if overrides is not None:
            plan.extra["overrides"] = recorded_overrides(overrides)
        launcher = get_launcher(cfg)
        # One launcher per run dir, from before run.yaml is written until the launcher
        # returns (a scheduler's: once submitted); a dry run writes nothing.
        with run_lock(paths.storage, paths.launcher_lock, enabled=not dry_run) as lock:
            if not dry_run:
                save_run_config(paths, cfg)
                if embed_input is not None and embed_input.sample is not None:
                    from lib.embed.sample import write_sample

                    write_sample(paths, embed_input.sample)
                plan.save(paths)
                for line in before_launch(paths, plan, requested):
                    print(line)
            print(f"embedfleet: {cfg.description or cfg.run.name}")
            print(f"run dir: {run_dir}")
            # A launcher that detaches (hosts, tpu_vm) hands the lock to its scheduler.
            result = launcher.start(paths, plan, dry_run=dry_run, lock=lock)
    except (EmbedfleetError, PermissionError) as exc:
        known = [*environ_secret_values(), *config_secret_values(to_plain(cfg))]
        print(f"error: {mask(str(exc), known)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before any task started (the launcher handles its own)
        print("interrupted: no task was started; rerun the same command", file=sys.stderr)
        return 130
    if result.interrupted is not None:
        return 130  # the launcher said what it stopped
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
    print_summary(paths, plan, time.time() - started)
    return 0


def resolve_run(arg: str) -> RunPaths:
    """The run dir a subcommand names: a run dir (path or URL), or ``run.name=...``
    overrides that compose to one."""
    paths = RunPaths(arg if is_url(arg) else str(Path(arg).absolute()))
    if paths.storage.exists(paths.run_config):
        return paths
    if "=" in arg:
        cfg = compose([arg])
        return RunPaths(join(str(cfg.run.root), str(cfg.run.name)))
    raise EmbedfleetError(
        f"{arg} is not a run dir (no {paths.run_config}); pass the directory launch.py printed"
    )
