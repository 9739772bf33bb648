"""What an embed task runs: its shard of the dataset (``lib.embed.shard``)."""

from __future__ import annotations

from lib.embed.checks import FINGERPRINT_KEY, check_input_at_task
from lib.embed.shard import ShardTask, run_embed_shard
from lib.runtime.context import TaskContext


def run(ctx: TaskContext) -> None:
    shard = ShardTask(
        paths=ctx.paths,
        stage=ctx.spec.name,
        stage_dir=ctx.spec.stage_dir,
        task=ctx.identity.task_index,
        num_tasks=ctx.spec.num_tasks,
        total_rows=ctx.plan.dataset_rows,
        config_hash=ctx.spec.config_hash,
    )
    check_input_at_task(ctx.cfg, ctx.plan.extra.get(FINGERPRINT_KEY))
    run_embed_shard(ctx.cfg, shard)
