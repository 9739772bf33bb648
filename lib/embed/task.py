"""What an embed task runs: its shard of the dataset (``lib.embed.shard``)."""

from __future__ import annotations

from lib.data.datasets import FILES_RECORD_KEY
from lib.embed.checks import FINGERPRINT_KEY, check_input_at_task
from lib.embed.shard import ShardTask, run_embed_shard
from lib.runtime.context import TaskContext

# Where Plan.extra keeps what the launch decided for the embed tasks.
SAMPLE_KEY = "sample"  # the sample's summary (lib.data.sampling.Sample.summary)
RANGES_KEY = "embed_ranges"  # each task's [start, stop) (a run grown by embed.append)


def run(ctx: TaskContext) -> None:
    extra = ctx.plan.extra
    ranges = extra.get(RANGES_KEY)
    shard = ShardTask(
        paths=ctx.paths,
        stage=ctx.spec.name,
        stage_dir=ctx.spec.stage_dir,
        task=ctx.identity.task_index,
        num_tasks=ctx.spec.num_tasks,
        total_rows=ctx.plan.dataset_rows,
        config_hash=ctx.spec.config_hash,
        ranges=tuple((int(a), int(b)) for a, b in ranges) if ranges else None,
        sampled=SAMPLE_KEY in extra,
        files=extra.get(FILES_RECORD_KEY),
    )
    check_input_at_task(ctx.cfg, extra.get(FINGERPRINT_KEY))
    run_embed_shard(ctx.cfg, shard)
