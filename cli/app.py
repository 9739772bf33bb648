"""embedfleet's command line: compose the config, plan the stages, hand them to a launcher.

    python launch.py +experiment=quickstart [KEY=VALUE ...] [--dry-run]
    python launch.py -m +experiment=NAME key=a,b
    python launch.py status|wait|retry|cancel|verify RUN_DIR
    python launch.py logs RUN_DIR STAGE TASK [--rank R] [--tail N]
    python launch.py search RUN_DIR "some text" [-k 10] [--json] [--row N] [--file F]
    python launch.py report RUN_DIR [--max-points N] [--umap]

``python launch.py --help`` lists the config groups; README.md tours the config. Without
arguments it prints the usage and the experiments (exit 2) instead of starting a run; a
first word that is neither a command nor an override is an unknown command (exit 2). A
config that fails the launch check (``lib.config.validate``: unknown keys, ``+`` or not,
values out of range, a ``run.name`` outside ``run.root``, a URL no installed file system
serves) is refused before Hydra creates the run dir, every sweep point included.
"""

from __future__ import annotations

import shlex
import sys
import time

SUBCOMMANDS = ("status", "wait", "logs", "retry", "cancel", "verify", "search", "report")
# `python launch.py STAGE [KEY=VALUE ...]` runs that stage only: stages=[STAGE].
STAGE_SHORTHANDS = ("sync",)
HYDRA_FLAGS = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--cfg", "-c", "--info"}
MULTIRUN_FLAGS = {"-m", "--multirun"}
# Sweep points composed and checked before Hydra starts (and creates run dirs); the rest
# are checked as each job starts, before it writes anything but Hydra's launch.log.
PREVALIDATE_SWEEP_POINTS = 16
USAGE = """usage:
  python launch.py +experiment=NAME [KEY=VALUE ...] [--dry-run] [--force-replan] [--attach]
  python launch.py sync sync=NAME [KEY=VALUE ...]        the sync stage only (stages=[sync])
  python launch.py -m +experiment=NAME KEY=a,b ...      one run per sweep point
  python launch.py status|wait|retry|cancel|verify RUN_DIR
  python launch.py logs RUN_DIR STAGE TASK [--rank R] [--tail N]
  python launch.py search RUN_DIR "some text" [-k 10] [--json] [--row N] [--file F]
  python launch.py report RUN_DIR [--max-points N] [--umap]   the run's HTML report page
  python launch.py --help                                config groups and options
  python launch.py COMMAND --help                        one command's options"""


def experiments() -> list[tuple[str, str]]:
    """``(name, description)`` of every ``conf/experiment/*.yaml``."""
    import yaml

    from lib.core.repo import CONF_DIR

    out = []
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            data = {}
        description = data.get("description", "") if isinstance(data, dict) else ""
        out.append((path.stem, str(description or "")))
    return out


def usage_text() -> str:
    """The usage and the experiments, for ``python launch.py`` without arguments."""
    rows = experiments()
    width = max((len(n) for n, _ in rows), default=0)
    lines = [USAGE, "", "experiments (+experiment=NAME):"]
    lines += [f"  {name:<{width}}  {description}" for name, description in rows]
    lines += ["", "e.g.: python launch.py +experiment=quickstart"]
    return "\n".join(lines)


def unknown_command(word: str) -> str:
    return (
        f"error: unknown command {word!r}; commands: {', '.join(SUBCOMMANDS)}; or launch a "
        "run with overrides KEY=VALUE (+KEY=VALUE adds a key, ~KEY removes one)\n\n" + USAGE
    )


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """The override lists of the jobs a ``-m`` sweep of ``overrides`` runs (Hydra's basic
    sweeper: the cartesian product); ``[overrides]`` when Hydra cannot parse them (its
    own message then comes from composing them)."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(overrides)
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # a grammar error: compose() reports it
        return [overrides]


def _compose_error(overrides: list[str]) -> str | None:
    from lib.config.compose import compose, explain_config_error

    try:
        compose(overrides)
    except Exception as exc:  # Hydra's and OmegaConf's errors, ours: explained alike
        return explain_config_error(exc)
    return None


def _secret_words(argv: list[str]) -> list[str]:
    """Passwords of URLs on the command line (``s3://user:pw@bucket``), to mask in messages
    that quote them in other forms (``"user:pw@bucket"``)."""
    import re

    words = []
    for arg in argv:
        for m in re.finditer(r"://[^\s/@:]*:([^\s/@]+)@", arg):
            words.append(m.group(1))
    return words


def _fail(message: str, argv: list[str], code: int = 2) -> None:
    from lib.config.redact import REDACTED, environ_secret_values, mask

    words = _secret_words(argv)
    for word in words:  # however short: mask() leaves words under 4 characters
        message = message.replace(f":{word}@", f":{REDACTED}@")
    print(mask(message, [*words, *environ_secret_values()]), file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    from lib.compute.models import force_offline

    force_offline()  # before any Hugging Face import: nothing is downloaded at run time
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        # A bare `python launch.py` would start the default run in the repo: show the
        # way in instead.
        print(usage_text())
        sys.exit(2)
    if argv[0] in SUBCOMMANDS:
        from cli.commands import run_subcommand

        sys.exit(run_subcommand(argv))
    if argv[0] in STAGE_SHORTHANDS:
        argv = [f"stages=[{argv[0]}]", *argv[1:]]
    if not argv[0].startswith(("-", "+", "~")) and "=" not in argv[0]:
        _fail(unknown_command(argv[0]), argv)
    dry_run = "--dry-run" in argv
    force_replan = "--force-replan" in argv
    if "--attach" in argv:  # cluster=hosts|tpu_vm: stream every task's log, prefixed
        argv = [a for a in argv if a != "--attach"] + ["cluster.multihost.attach=true"]
    argv = [a for a in argv if a not in ("--dry-run", "--force-replan")]
    flags = HYDRA_FLAGS.intersection(argv)
    if flags <= MULTIRUN_FLAGS and not any(a.startswith("--") and a not in flags for a in argv):
        from cli.run import prevalidate

        overrides = [a for a in argv if not a.startswith("-")]
        if flags:
            from lib.config.redact import secret_overrides

            if secret := secret_overrides(overrides):
                names = ", ".join(secret)
                _fail(
                    f"error: {names} on the command line of a sweep (-m) would be written by "
                    "Hydra into multirun.yaml, the run dir names and its log; give secrets "
                    "through the environment: export NAME, then cluster.pass_env=[NAME] (or "
                    "cluster.env_file=FILE)",
                    argv,
                )
        points = sweep_points(overrides) if flags else [overrides]
        # Every point's config first, then (the first point's, which all share) whether
        # the run dir can be written: that check creates it.
        checked = points[:PREVALIDATE_SWEEP_POINTS]
        for point in [*checked[1:], checked[0]]:
            error = prevalidate(point) if point is checked[0] else _compose_error(point)
            if error:
                where = f" (sweep point {shlex.join(point)})" if len(points) > 1 else ""
                _fail(error + where, argv)
    sys.argv = [sys.argv[0], *argv]
    _hydra_app(dry_run, force_replan)


def _hydra_app(dry_run: bool, force_replan: bool = False) -> None:
    import hydra
    from omegaconf import DictConfig

    from lib.config.compose import register_configs
    from lib.core.repo import CONF_DIR

    register_configs()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from cli.run import launch_run
        from lib.config.validate import validate_config
        from lib.core.errors import ConfigError

        try:
            validate_config(cfg)  # sweep points past the prevalidated ones, Hydra flags
        except ConfigError as exc:
            _fail(f"config error: {exc}", sys.argv[1:])
        code = launch_run(
            cfg,
            dry_run=dry_run,
            started=time.time(),
            force_replan=force_replan,
            overrides=list(HydraConfig.get().overrides.task),
        )
        if code:
            sys.exit(code)

    app()
