"""The stages a config can name in ``stages:``, in one explicit table.

Each entry names a stage package, whose modules are imported only when a plan uses them
(no import-time registration)::

    <package>.plan.build(cfg, dataset_rows, prior) -> list[StageSpec]  # prior: planned so far
    <package>.summary.summary(paths, specs) -> list[str]   # end-of-run summary (optional)
    <package>.plan.before_launch(paths, specs) -> list[str]  # before a launch runs it (optional)

Adding a stage is a new package under ``lib/`` and one line here.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from omegaconf import DictConfig

from lib.core.errors import ConfigError
from lib.core.paths import RunPaths
from lib.plan.spec import Plan, StageSpec

STAGES: dict[str, str] = {
    "embed": "lib.embed",
    "sync": "lib.sync",
    "merge": "lib.merge",
    "kmeans": "lib.kmeans",
    "curate": "lib.curate",
    "metrics": "lib.metrics",
    "index": "lib.index",
    "report": "lib.report",
    "extract": "lib.extract",
}


def stage_module(name: str, part: str = "plan") -> ModuleType | None:
    """Module ``part`` (``plan``, ``summary``) of stage ``name``; ``ConfigError`` listing
    the known stages; None when the stage has no such module."""
    if name not in STAGES:
        raise ConfigError(f"stages: unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    module = f"{STAGES[name]}.{part}"
    if importlib.util.find_spec(module) is None:
        return None
    return importlib.import_module(module)


def build_plan(cfg: DictConfig, dataset_rows: int) -> Plan:
    """The ordered stage plan for ``cfg``. Raises ``ConfigError`` for an unknown stage or
    settings a stage refuses."""
    prior: dict[str, StageSpec] = {}
    stages: list[StageSpec] = []
    for name in cfg.stages:
        for spec in stage_module(str(name)).build(cfg, dataset_rows, prior):
            prior[spec.name] = spec
            prior.setdefault(spec.group, spec)
            stages.append(spec)
    return Plan(stages, dataset_rows)


def summary_lines(paths: RunPaths, plan: Plan) -> list[str]:
    """What each stage of a finished run says about its outputs, in plan order."""
    lines: list[str] = []
    for group in dict.fromkeys(s.group for s in plan.stages):
        module = stage_module(group, "summary") if group in STAGES else None
        if module is not None:
            lines += module.summary(paths, plan.group(group))
    return lines


def before_launch(paths: RunPaths, plan: Plan, requested: list[str]) -> list[str]:
    """Run the ``before_launch`` hook of each stage group in ``requested`` that has one
    (sync: look at the hosts again) before a launch that is not a dry run; returns the
    lines to print."""
    lines: list[str] = []
    for group in dict.fromkeys(s.group for s in plan.stages):
        if group not in requested or group not in STAGES:
            continue
        hook = getattr(stage_module(group), "before_launch", None)
        if hook is not None:
            lines += hook(paths, plan.group(group))
    return lines
