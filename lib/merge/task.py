"""The merge task: collect and validate the shards, stream them into one matrix, write the
row tables and the per-source split, then the marker."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lib.config.fields import to_params
from lib.core.errors import ShardValidationError
from lib.core.markers import CompletionMarker, write_marker
from lib.core.paths import RunPaths
from lib.merge.inputs import collect_embed_shards, collect_legacy_shards, validate_layout
from lib.merge.params import MergeFormat, MergeInput, MergeParams
from lib.merge.stream import merge_shards
from lib.merge.tables import duplicate_ids_of, merge_dropped, merge_metadata, split_by_source
from lib.plan.spec import StageSpec
from lib.runtime.context import TaskContext

log = logging.getLogger(__name__)


def run_merge(
    m: MergeParams, paths: RunPaths, spec: StageSpec, embed: StageSpec | None, total_rows: int
) -> CompletionMarker:
    """Merge the shards of ``embed`` (or the legacy pickles of ``m.legacy_dir``)."""
    t0 = time.monotonic()
    storage = paths.storage
    # One merge task per run: every temporary under merge/ is a leftover of a killed one.
    removed = storage.clean_temporaries(f"{spec.stage_dir}/")
    if removed:
        log.info("removed %d temporary file(s) of an interrupted merge", removed)
    if MergeInput(m.input) == MergeInput.legacy:
        if not m.legacy_dir:
            raise ShardValidationError("merge.input=legacy needs merge.legacy_dir=/path/to/pickles")
        inputs = collect_legacy_shards(Path(m.legacy_dir), bool(m.allow_pickle))
        validate_layout(inputs, None)
    else:
        if embed is None:
            raise ShardValidationError("merge.input=embed needs the embed stage in `stages`")
        inputs = collect_embed_shards(paths, embed)
        validate_layout(inputs, total_rows)
    formats = [MergeFormat(f) for f in m.formats]
    if not formats:
        raise ShardValidationError("merge.formats is empty; use [safetensors] and/or [npy]")
    log.info(
        "merging %d shard(s), %d rows, into %s",
        len(inputs),
        sum(s.rows for s in inputs),
        paths.url(spec.stage_dir),
    )
    report, outputs = merge_shards(
        inputs,
        storage,
        formats,
        keep_first=m.keep_first,
        expected_rows=m.expected_rows,
        chunk_rows=int(m.chunk_rows),
        verify_sha256=bool(m.verify_sha256),
    )
    outputs.append(merge_metadata(inputs, storage, paths.merge_metadata, m.keep_first))
    report["rows_dropped"], dropped = merge_dropped(inputs, storage, paths.merge_dropped)
    outputs.append(dropped)
    report["duplicate_ids"], report["duplicate_id_examples"] = duplicate_ids_of(
        storage, paths.merge_metadata
    )
    if report["duplicate_ids"]:
        first, rows = next(iter(report["duplicate_id_examples"].items()))
        log.warning(
            "%d embedded row(s) repeat an earlier id (first: %r at dataset rows %s); set "
            "dataset.unique_ids=true to make duplicate ids an error at launch",
            report["duplicate_ids"],
            first,
            rows[:10],
        )
    if m.by_source:
        report["by_source"], split = split_by_source(
            paths, outputs[0].path, paths.merge_metadata, int(m.chunk_rows)
        )
        outputs += split
    outputs.append(storage.publish_json(paths.merge_report, report))
    marker = CompletionMarker(
        stage=spec.name,
        task=0,
        num_tasks=1,
        config_hash=spec.config_hash,
        row_range=[0, report["shape"][0]],
        counts={
            "rows": report["shape"][0],
            "dim": report["shape"][1],
            "shards": len(inputs),
            "dropped": report["rows_dropped"],
        },
        outputs=outputs,
        wall_seconds=time.monotonic() - t0,
    )
    write_marker(storage, paths.marker(spec.stage_dir, 0), marker)
    log.info(
        "merge done: %s rows x %s dims in %.1fs",
        report["shape"][0],
        report["shape"][1],
        marker.wall_seconds,
    )
    return marker


def run(ctx: TaskContext) -> None:
    embed = next(iter(ctx.plan.group("embed")), None)  # upstream markers: checked by the runner
    run_merge(
        to_params(ctx.cfg.merge, MergeParams), ctx.paths, ctx.spec, embed, ctx.plan.dataset_rows
    )
