"""The merge task: collect and validate the shards, stream them into one matrix, write the
row tables and the per-source split, then the marker."""

from __future__ import annotations

import logging
import time

from omegaconf import OmegaConf

from lib.config.fields import to_params
from lib.core.errors import ShardValidationError
from lib.core.markers import CompletionMarker, write_marker
from lib.core.paths import RunPaths
from lib.merge.inputs import (
    ShardInput,
    collect_embed_shards,
    collect_legacy_shards,
    validate_layout,
)
from lib.merge.params import MergeFormat, MergeInput, MergeParams
from lib.merge.row_metadata import MetadataFile
from lib.merge.sources import legacy_dir_source, sync_root_url, sync_sources
from lib.merge.stream import merge_shards
from lib.merge.synced import collect_synced_shards
from lib.merge.tables import (
    check_metadata_rows,
    duplicate_ids_of,
    merge_dropped,
    merge_metadata,
    split_by_source,
)
from lib.plan.spec import StageSpec
from lib.runtime.context import TaskContext

log = logging.getLogger(__name__)


def collect_inputs(
    m: MergeParams,
    paths: RunPaths,
    embed: StageSpec | None,
    total_rows: int,
    sync_dest: str | None = None,
) -> list[ShardInput]:
    """The validated shards of ``m.input``: the embed stage's, the legacy pickles of
    ``m.legacy_dir`` or of every synced source, or the embed shards synced from other
    hosts (``sync/<source>/``, or ``sync_dest/<source>/``). Raises
    ``ShardValidationError`` with every problem, before anything is written."""
    kind = MergeInput(m.input)
    if kind == MergeInput.embed:
        if embed is None:
            raise ShardValidationError("merge.input=embed needs the embed stage in `stages`")
        inputs = collect_embed_shards(paths, embed)
        validate_layout(inputs, total_rows)
        return inputs
    if kind == MergeInput.legacy and m.legacy_dir:
        sources = [legacy_dir_source(str(m.legacy_dir))]
    else:
        sources = sync_sources(paths, sync_dest)
        if not sources:
            root = sync_root_url(paths, sync_dest)
            fix = "run the sync first (stages=[sync,merge] with sync.sources naming the hosts)"
            if kind == MergeInput.legacy:
                fix = f"set merge.legacy_dir=/path/to/pickles, or {fix}"
            raise ShardValidationError(
                f"merge.input={kind.value} reads shards synced into {root}/<source>/, and "
                f"there is none: {fix}"
            )
    if kind == MergeInput.legacy:
        inputs = collect_legacy_shards(sources, bool(m.allow_pickle))
        validate_layout(inputs, None)
        return inputs
    inputs = collect_synced_shards(sources, embed.config_hash if embed else None)
    validate_layout(inputs, total_rows if embed else None)
    return inputs


def run_merge(
    m: MergeParams,
    paths: RunPaths,
    spec: StageSpec,
    embed: StageSpec | None,
    total_rows: int,
    sync_dest: str | None = None,
) -> CompletionMarker:
    """Merge the shards of ``m.input`` (``collect_inputs``) and publish the merge outputs,
    then the marker. Raises ``ShardValidationError`` (nothing published) on bad input."""
    t0 = time.monotonic()
    storage = paths.storage
    # One merge task per run: every temporary under merge/ is a leftover of a killed one.
    removed = storage.clean_temporaries(f"{spec.stage_dir}/")
    if removed:
        log.info("removed %d temporary file(s) of an interrupted merge", removed)
    inputs = collect_inputs(m, paths, embed, total_rows, sync_dest)
    extra = None
    if m.metadata_path:
        extra = MetadataFile(str(m.metadata_path), bool(m.allow_pickle))
        check_metadata_rows(extra, inputs, m.keep_first)
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
    outputs.append(
        merge_metadata(
            inputs, storage, paths.merge_metadata, m.keep_first, extra, int(m.chunk_rows)
        )
    )
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
        to_params(ctx.cfg.merge, MergeParams),
        ctx.paths,
        ctx.spec,
        embed,
        ctx.plan.dataset_rows,
        OmegaConf.select(ctx.cfg, "sync.dest", default=None),
    )
