"""Merge stage: validate every embed shard, stream them into one matrix, split by source."""

from __future__ import annotations

import sys

from jobs._common import JobContext, run_job
from lib.config import MergeInput
from lib.merge import run_merge
from lib.pipeline import require_complete


def body(ctx: JobContext) -> None:
    embed = next((s for s in ctx.plan.stages if s.group == "embed"), None)
    if MergeInput(ctx.cfg.merge.input) == MergeInput.embed and embed is not None:
        # Runs after `afterany` on SLURM: check the upstream markers ourselves and fail
        # clearly, never wait on a dependency that cannot be satisfied.
        require_complete(ctx.run_dir, embed, ctx.spec.name)
    run_merge(ctx.cfg, ctx.run_dir, ctx.spec, embed, ctx.plan.dataset_rows)


def main(argv: list[str] | None = None) -> int:
    return run_job("merge", body, argv)


if __name__ == "__main__":
    sys.exit(main())
