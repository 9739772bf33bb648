"""Merge stage: validate every embed shard, stream them into one matrix, split by source."""

from __future__ import annotations

import sys

from jobs._common import JobContext, run_job
from lib.merge import run_merge


def body(ctx: JobContext) -> None:
    # Upstream markers were checked by run_job (spec.depends_on).
    embed = next((s for s in ctx.plan.stages if s.group == "embed"), None)
    run_merge(ctx.cfg, ctx.run_dir, ctx.spec, embed, ctx.plan.dataset_rows)


def main(argv: list[str] | None = None) -> int:
    return run_job("merge", body, argv)


if __name__ == "__main__":
    sys.exit(main())
