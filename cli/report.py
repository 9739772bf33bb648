"""``launch.py report RUN_DIR``: (re)draw a run's report page from its outputs.

    python launch.py report RUN_DIR [--max-points N] [--umap] [--no-umap]

The same page the report stage writes (``lib.report``): ``report/index.html`` in the run
dir, one self-contained file (plotly.js inlined, nothing loaded from the network), and
its marker. Works on any run, whichever stages it has (or has finished so far); an
earlier page is replaced. ``report.*`` settings of the run apply unless an option here
overrides them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from cli.argtypes import positive
from lib.core.errors import ConfigError

REPORT_EPILOG = (
    "exit codes: 0 the page was written (its path printed); 1 the command failed (not a "
    "run dir, an output that cannot be read); 2 bad arguments"
)


def add_report_parser(add: Callable[..., argparse.ArgumentParser], run_help: str) -> None:
    """The ``report`` subcommand (``add`` is ``cli.commands``' helper)."""
    s = add(
        "report",
        "write the run's report page (report/index.html) from its outputs",
        "Write report/index.html in the run dir: one self-contained HTML page (every "
        "script inlined, nothing loaded from the network) with a section per stage the run "
        "has: Run (stages, wall time, rows/s, peak memory, dropped rows), Embeddings (L2 "
        "norms, PCA scree, a map coloured by source, texts at both ends of the first "
        "components, source similarity), Clustering (sizes, metrics, best and worst "
        "clusters, maps by cluster) and Curation (source balance and cluster sizes "
        "before/after). Replaces an earlier page.",
        REPORT_EPILOG,
    )
    s.add_argument("run", help=run_help)
    s.add_argument(
        "--max-points",
        type=positive,
        default=None,
        help="points on the maps at most, sampled per source (default: report.max_points, 50000)",
    )
    umap = s.add_mutually_exclusive_group()
    umap.add_argument(
        "--umap", dest="umap", action="store_true", default=None, help="add a UMAP map (umap-learn)"
    )
    umap.add_argument("--no-umap", dest="umap", action="store_false", help="no UMAP map")
    s.set_defaults(fn=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from cli.run import resolve_run
    from lib.config.compose import load_run_config
    from lib.core.paths import REPORT_STAGE
    from lib.plan.spec import Plan
    from lib.report.plan import report_hash, report_params
    from lib.report.task import write_report

    paths = resolve_run(args.run)
    cfg = load_run_config(paths)
    plan = Plan.load(paths)
    params = report_params(cfg)
    if args.max_points is not None:
        params.max_points = int(args.max_points)
    if args.umap is not None:
        params.umap = bool(args.umap)
    planned = [s for s in plan.stages if s.group == REPORT_STAGE]
    if len(planned) > 1:
        raise ConfigError(f"{paths.url(paths.plan)} plans {len(planned)} report stages")
    upstream = [s for s in plan.stages if s.group != REPORT_STAGE]
    config_hash = planned[0].config_hash if planned else report_hash(upstream)
    write_report(paths, cfg, plan, params, config_hash=config_hash)
    print(paths.url(paths.report_page))
    return 0
