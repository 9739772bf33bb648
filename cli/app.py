"""embedfleet's command line: compose the config, plan the stages, hand them to a launcher.

    python launch.py +experiment=quickstart [KEY=VALUE ...] [--dry-run]
    python launch.py -m +experiment=NAME key=a,b
    python launch.py status|wait|retry|cancel|verify RUN_DIR
    python launch.py logs RUN_DIR STAGE TASK [--rank R] [--tail N]

``python launch.py --help`` lists the config groups; README.md tours the config.
"""

from __future__ import annotations

import sys
import time

SUBCOMMANDS = ("status", "wait", "logs", "retry", "cancel", "verify")
HYDRA_FLAGS = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--cfg", "-c", "--info"}


def main(argv: list[str] | None = None) -> None:
    from lib.compute.models import force_offline

    force_offline()  # before any Hugging Face import: nothing is downloaded at run time
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        from cli.commands import run_subcommand

        sys.exit(run_subcommand(argv))
    dry_run = "--dry-run" in argv
    force_replan = "--force-replan" in argv
    argv = [a for a in argv if a not in ("--dry-run", "--force-replan")]
    if not HYDRA_FLAGS.intersection(argv) and not any(a.startswith("--") for a in argv):
        from cli.run import prevalidate

        error = prevalidate([a for a in argv if not a.startswith("-")])
        if error:
            print(error, file=sys.stderr)
            sys.exit(2)
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
        from cli.run import launch_run

        code = launch_run(cfg, dry_run=dry_run, started=time.time(), force_replan=force_replan)
        if code:
            sys.exit(code)

    app()
