"""The merge stage's inputs, collected and validated before any output is written.

Every shard present, row ranges tiling ``0..N`` with no gap or overlap (each offending
shard named), files the size their marker recorded, one dimension and dtype everywhere.
A shard whose rows were all dropped holds 0 rows and merges to nothing; shards that are
all empty are refused.
Every problem is collected, then raised at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib.core.errors import InvalidMarkerError, ShardValidationError
from lib.core.markers import CompletionMarker, output_problems, parse_marker, reject_marker
from lib.core.paths import RunPaths, ShardFiles
from lib.core.sharding import compress_indices
from lib.core.storage import Storage
from lib.formats.arrays import ST_TO_NUMPY, ArrayFormatError, read_safetensors_header
from lib.merge.sources import LEGACY_GLOB, SourceDir
from lib.plan.spec import StageSpec

log = logging.getLogger(__name__)


@dataclass
class ShardInput:
    """One shard as the merge sees it (from an embed marker or a legacy pickle)."""

    task: int
    row_start: int
    row_stop: int
    rows: int  # embedded rows (<= row_stop - row_start; the rest were dropped)
    dim: int
    dtype: str
    label: str  # for messages: file name
    storage: Storage | None = None  # where the files below live
    embeddings: str | None = None
    data_offset: int = 0  # byte offset of the tensor data in the file
    metadata: str | None = None
    dropped: str | None = None
    sha256: str | None = None  # expected sha256 of the embeddings file
    marker_name: str | None = None  # its completion marker, invalidated if a file mismatches
    marker: CompletionMarker | None = None
    array: np.ndarray | None = None  # legacy shards arrive in memory
    source_files: list[str] = field(default_factory=list)
    source: str | None = None  # the synced source it came from (messages, the report)
    ids: list[str] | None = None  # a legacy shard's own row ids, when its pickle has them
    # None: the run's own shard, whose marker is invalidated on a mismatch. Else a copy of
    # another host's marker (synced), left in place, and what to tell the user instead.
    fix: str | None = None

    def describe(self, rows: str) -> str:
        """``cluster0_gpu7.pkl (source a, rows ..800)``, for messages."""
        where = f"source {self.source}, " if self.source else ""
        return f"{self.label} ({where}rows {rows})"


@dataclass(frozen=True)
class MarkedShard:
    """An embed shard named by its producer's completion marker, found in ``storage``."""

    task: int
    marker_name: str
    marker: CompletionMarker  # its outputs named as in ``storage`` (the local names)
    files: ShardFiles  # the shard's files in ``storage``
    source: str | None = None
    fix: str | None = None  # see ``ShardInput.fix``


def refused(problems: list[str]) -> ShardValidationError:
    return ShardValidationError("merge refused, nothing written:\n  - " + "\n  - ".join(problems))


def mismatch_message(
    storage: Storage,
    name: str,
    marker: CompletionMarker | None,
    problems: dict[str, str],
    fix: str | None,
) -> str:
    """What no longer matches a shard's marker, and what to do: the run's own marker is
    invalidated (``reject_marker``); a synced copy (``fix`` not None) stays in place."""
    if fix is None:
        return reject_marker(storage, name, marker, problems)
    return f"{'; '.join(problems.values())} (its marker: {storage.url(name)}, left in place); {fix}"


def check_marked_shards(
    storage: Storage, shards: list[MarkedShard], sizes: dict[str, int]
) -> tuple[list[ShardInput], list[str]]:
    """Check each shard against its marker (names, sizes; the sha256 comes while streaming,
    ``lib.merge.stream``) and read its header. ``sizes``: a listing covering the files.
    Returns the shards that passed and a problem per shard that did not."""
    problems: list[str] = []
    inputs: list[ShardInput] = []
    for shard in shards:
        task, mname, marker, files = shard.task, shard.marker_name, shard.marker, shard.files
        murl = storage.url(mname)
        recorded = {o.path: o for o in marker.outputs}
        unnamed = [n for n in files.all() if n not in recorded]
        if unnamed:
            redo = shard.fix or f"rerun task {task} of embed"
            problems.append(f"{murl}: does not name {unnamed}; {redo}")
            continue
        bad = output_problems(storage, marker, sizes=sizes, verify_sha256=False)
        if bad:
            detail = mismatch_message(storage, mname, marker, bad, shard.fix)
            problems.append(f"shard {task}: {detail}")
            continue
        try:
            with storage.open(files.embeddings) as fh:
                header, offset = read_safetensors_header(
                    fh, sizes[files.embeddings], storage.url(files.embeddings)
                )
            info = header["embeddings"]
            rows, dim = info["shape"]
            expected_rows = marker.counts.get("embedded")
            if expected_rows is not None and rows != expected_rows:
                raise ArrayFormatError(f"has {rows} rows, its marker says {expected_rows}")
        except (ArrayFormatError, KeyError, ValueError) as exc:
            # A header that disagrees with a file of the recorded size: corrupted in place
            # when its sha256 differs too (then the marker goes), else a bug to report.
            bad = output_problems(storage, marker, only=[files.embeddings])
            detail = mismatch_message(storage, mname, marker, bad, shard.fix) if bad else str(exc)
            problems.append(f"shard {task}: {storage.url(files.embeddings)}: {detail}")
            continue
        start, stop = marker.row_range or (0, 0)
        inputs.append(
            ShardInput(
                task=task,
                row_start=start,
                row_stop=stop,
                rows=rows,
                dim=dim,
                dtype=ST_TO_NUMPY.get(info["dtype"], info["dtype"]),
                label=Path(files.embeddings).name,
                storage=storage,
                embeddings=files.embeddings,
                data_offset=offset + info["data_offsets"][0],
                metadata=files.metadata,
                dropped=files.dropped,
                sha256=recorded[files.embeddings].sha256,
                marker_name=mname,
                marker=marker,
                source_files=files.all(),
                source=shard.source,
                fix=shard.fix,
            )
        )
    return inputs, problems


def refuse_all_dropped(inputs: list[ShardInput], where: str) -> None:
    """Empty shards are valid and merge to nothing; a merge of nothing at all is not a
    result (and its L2 norms would be undefined)."""
    if inputs and not any(s.rows for s in inputs):
        raise refused(
            [
                f"every row of the {len(inputs)} shard(s) was dropped, so there is nothing to "
                f"merge: see the reasons in {where}/*.dropped.parquet (too_long: raise "
                "model.max_length; empty/null_text: fix the data)"
            ]
        )


def collect_embed_shards(paths: RunPaths, embed: StageSpec) -> list[ShardInput]:
    """Read every embed marker and shard header. Problems are collected, then raised once."""
    storage = paths.storage
    problems: list[str] = []
    missing: list[int] = []
    shards: list[MarkedShard] = []
    sizes = storage.list(embed.stage_dir)  # one listing, one batched read of the markers
    names = [paths.marker(embed.stage_dir, task) for task in range(embed.num_tasks)]
    blobs = storage.read_many([n for n in names if n in sizes])
    for task, mname in enumerate(names):
        murl = storage.url(mname)
        if mname not in blobs:
            missing.append(task)
            continue
        try:
            marker = parse_marker(blobs[mname], murl)
        except InvalidMarkerError as exc:
            problems.append(str(exc))
            continue
        if marker.config_hash != embed.config_hash:
            problems.append(f"{murl}: written under another embed config; rerun task {task}")
            continue
        shards.append(MarkedShard(task, mname, marker, paths.embed_shard(task)))
    inputs, bad = check_marked_shards(storage, shards, sizes)
    problems += bad
    if missing:
        problems.insert(
            0,
            f"{len(missing)} of {embed.num_tasks} embed shard(s) missing (no completion marker): "
            f"tasks {compress_indices(missing)}; run `python launch.py retry {paths.root}`",
        )
    if problems:
        raise refused(problems)
    refuse_all_dropped(inputs, storage.url(paths.embed_shards()))
    return inputs


def collect_legacy_shards(sources: list[SourceDir], allow_pickle: bool) -> list[ShardInput]:
    """Load the ``cluster{c}_gpu{g}.pkl`` shards of the seed runs found (at any depth) in
    ``sources`` (only with allow_pickle). Raises ``ShardValidationError`` naming the file."""
    if not allow_pickle:
        raise ShardValidationError(
            "merge.input=legacy reads pickle files, and loading a pickle runs whatever code it "
            "contains. Only do this for files you produced yourself: set merge.allow_pickle=true."
        )
    found = [(src, name) for src in sources for name in src.matching(LEGACY_GLOB)]
    if not found:
        where = ", ".join(src.describe() for src in sources) or "no directory"
        raise ShardValidationError(
            f"merge.input=legacy: no {LEGACY_GLOB} files found in {where}: set "
            "merge.legacy_dir to the directory of the pickles (or sync them first)"
        )
    log.warning(
        "loading %d legacy pickle shard(s) from %s: unpickling runs code from those files "
        "(allowed by merge.allow_pickle=true)",
        len(found),
        ", ".join(src.url for src in sources),
    )
    import pickle

    inputs = []
    for i, (src, name) in enumerate(found):
        f = src.storage.url(name)
        with src.storage.open(name) as fh:
            obj = pickle.load(fh)
        try:
            emb = np.asarray(obj["embeddings"], dtype=np.float32)
            start, end = int(obj["start_index"]), int(obj["end_index"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardValidationError(
                f"{f}: expected a dict with embeddings, start_index, end_index ({exc})"
            ) from exc
        if emb.ndim != 2:
            raise ShardValidationError(f"{f}: embeddings must be 2-D, found shape {emb.shape}")
        # The seed scripts were inconsistent about an inclusive end index; accept both.
        if emb.shape[0] == end - start + 1:
            end += 1
        if emb.shape[0] != end - start:
            raise ShardValidationError(
                f"{f}: {emb.shape[0]} rows but start_index={start}, end_index={end}"
            )
        ids = obj.get("ids")
        if ids is not None and len(ids) != emb.shape[0]:
            raise ShardValidationError(
                f"{f}: {len(ids)} ids for {emb.shape[0]} embeddings; drop the ids key or fix it"
            )
        inputs.append(
            ShardInput(
                task=i,
                row_start=start,
                row_stop=end,
                rows=emb.shape[0],
                dim=emb.shape[1],
                dtype="float32",
                label=name.rsplit("/", 1)[-1],
                array=emb,
                source_files=[f],
                source=src.name,
                ids=None if ids is None else [str(x) for x in ids],
            )
        )
    return inputs


def validate_layout(inputs: list[ShardInput], total_rows: int | None) -> None:
    """Ranges tile 0..total with no gap/overlap; one dim and dtype. Raises with every problem."""
    problems: list[str] = []
    ordered = sorted(inputs, key=lambda s: (s.row_start, s.row_stop))
    expected = 0
    last: ShardInput | None = None  # the shard that reaches row ``expected``
    for s in ordered:
        if s.row_start > expected:
            after = f"between {last.describe(f'..{expected}')} and " if last else "before "
            problems.append(
                f"gap: rows {expected}..{s.row_start} are in no shard: "
                f"{after}{s.describe(f'{s.row_start}..')}"
            )
        elif s.row_start < expected and last is not None:
            problems.append(
                f"overlap: {s.describe(f'{s.row_start}..{s.row_stop}')} and "
                f"{last.describe(f'{last.row_start}..{last.row_stop}')} both cover rows "
                f"{s.row_start}..{min(expected, s.row_stop)}"
            )
        if last is None or s.row_stop > expected:
            expected, last = s.row_stop, s
    if total_rows is not None and expected != total_rows:
        after = f" after {last.describe(f'..{expected}')}" if last else ""
        problems.append(
            f"gap: rows {expected}..{total_rows} are in no shard{after} (dataset has {total_rows})"
        )
    dims = {s.dim for s in inputs}
    if len(dims) > 1:
        common = max(dims, key=lambda d: sum(s.dim == d for s in inputs))
        for s in inputs:
            if s.dim != common:
                problems.append(f"{s.label}: dimension {s.dim}, the other shards have {common}")
    dtypes = {s.dtype for s in inputs}
    if len(dtypes) > 1:
        problems.append(f"shards have different dtypes: {sorted(dtypes)}")
    if problems:
        raise refused(problems)
