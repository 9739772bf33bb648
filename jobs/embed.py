"""Embed stage task: one contiguous row range of the dataset -> one shard."""

from __future__ import annotations

import sys

from jobs._common import JobContext, run_job
from lib.embed_shard import run_embed_shard


def body(ctx: JobContext) -> None:
    run_embed_shard(
        ctx.cfg,
        ctx.identity.task_index,
        ctx.spec.num_tasks,
        ctx.plan.dataset_rows,
        ctx.spec.config_hash,
        ctx.run_dir,
    )


def main(argv: list[str] | None = None) -> int:
    return run_job("embed", body, argv)


if __name__ == "__main__":
    sys.exit(main())
