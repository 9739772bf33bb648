"""The report stage in a plan: one task after every other stage the run has.

It reads whatever those stages left (nothing is required but the run dir), so it plans
after any subset of stages, alone included. Its hash chains the hashes of the stages
planned before it; ``report.*`` is not hashed (it changes only the page).
"""

from __future__ import annotations

from omegaconf import DictConfig

from lib.config.fields import to_params
from lib.core.hashing import config_digest
from lib.core.paths import REPORT_DIR, REPORT_STAGE
from lib.plan.spec import SINGLE, StageSpec
from lib.report.params import ReportParams


def report_params(cfg: DictConfig) -> ReportParams:
    return to_params(cfg.report, ReportParams)


def report_hash(upstream: list[StageSpec]) -> str:
    """The report's config hash given the stages planned before it."""
    return config_digest(REPORT_STAGE, [[s.name, s.config_hash] for s in upstream])


def build(cfg: DictConfig, rows: int, prior: dict[str, StageSpec]) -> list[StageSpec]:
    upstream = list({s.name: s for s in prior.values()}.values())
    return [
        StageSpec(
            REPORT_STAGE,
            REPORT_STAGE,
            "jobs.report",
            REPORT_DIR,
            SINGLE,
            1,
            report_hash(upstream),
            depends_on=tuple(s.name for s in upstream),
        )
    ]
