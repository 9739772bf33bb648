#!/usr/bin/env python
"""embedfleet's command line: compose the config, plan the stages, hand them to a launcher.

    python launch.py +experiment=quickstart [KEY=VALUE ...] [--dry-run]
    python launch.py -m +experiment=NAME key=a,b
    python launch.py status|wait|retry|cancel RUN_DIR
    python launch.py logs RUN_DIR STAGE TASK [--rank R] [--tail N]

``python launch.py --help`` lists the config groups; README.md tours the config.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SUBCOMMANDS = ("status", "wait", "logs", "retry", "cancel")
_STATE = {"dry_run": False}


def main() -> None:
    from lib.models import force_offline

    force_offline()  # before any Hugging Face import: nothing is downloaded at run time
    argv = sys.argv[1:]
    if argv and argv[0] in SUBCOMMANDS:
        from launchers.cli import run_subcommand

        sys.exit(run_subcommand(argv))
    if "--dry-run" in argv:
        _STATE["dry_run"] = True
        argv = [a for a in argv if a != "--dry-run"]
    hydra_flags = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--cfg", "-c", "--info"}
    if not hydra_flags.intersection(argv) and not any(a.startswith("--") for a in argv):
        from launchers.cli import prevalidate

        error = prevalidate([a for a in argv if not a.startswith("-")])
        if error:
            print(error, file=sys.stderr)
            sys.exit(2)
    sys.argv = [sys.argv[0], *argv]
    _hydra_app()


def _hydra_app() -> None:
    import hydra
    from omegaconf import DictConfig

    from lib.config import register_configs

    register_configs()

    @hydra.main(config_path="conf", config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        from launchers.cli import launch_run

        code = launch_run(cfg, dry_run=_STATE["dry_run"], started=time.time())
        if code:
            sys.exit(code)

    app()


if __name__ == "__main__":
    main()
