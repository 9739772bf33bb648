"""``merge.input=synced``: embed shards made on other hosts, synced into ``sync/<source>/``.

Each source dir holds an embed stage dir, or part of one, as its host wrote it:
``shards/shard_XXXXX.{safetensors,parquet,dropped.parquet}`` and the producer's markers
``completions/task_XXXXX.json`` (at any depth: a synced run dir keeps ``embed/`` above
them). Every embed marker found is read; together they must carry one config hash (the
planned embed stage's, when the plan has one), one task count, and every task exactly once
(the same task on two sources is accepted only when both copies record the same files).
Then each shard is checked against its marker like the run's own
(``lib.merge.inputs.check_marked_shards``: names, sizes, header; the sha256 while
streaming). A synced marker is a copy of another host's: on a mismatch it stays in place,
and the message says to sync the file again.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass

from lib.core.errors import InvalidMarkerError
from lib.core.markers import CompletionMarker, parse_marker
from lib.core.paths import EMBED_DIR, EMBED_STAGE, RunPaths, ShardFiles
from lib.core.sharding import compress_indices
from lib.core.storage import OutputFile
from lib.merge.inputs import (
    MarkedShard,
    ShardInput,
    check_marked_shards,
    refuse_all_dropped,
    refused,
)
from lib.merge.sources import SourceDir

log = logging.getLogger(__name__)

# A task's marker in a synced embed stage dir: <stage dir>/completions/task_XXXXX.json.
SYNCED_MARKER = re.compile(r"(?:(.+)/)?completions/task_(\d+)\.json")


@dataclass(frozen=True)
class FoundMarker:
    """An embed task marker found in a source dir."""

    source: SourceDir
    name: str  # in ``source.storage``
    marker: CompletionMarker  # as its producer wrote it
    stage_dir: str  # the local dir that holds its ``completions/`` ("" for the root)

    @property
    def url(self) -> str:
        return self.source.storage.url(self.name)

    def local(self, output: str) -> str | None:
        """Where the producer's output ``embed/shards/x`` is here; None if it is not a
        file of an embed stage dir."""
        prefix = f"{EMBED_DIR}/"
        if not output.startswith(prefix):
            return None
        rel = output[len(prefix) :]
        return f"{self.stage_dir}/{rel}" if self.stage_dir else rel

    def recorded(self) -> dict[str, str]:
        """The producer's outputs (its names) -> sha256: what makes two copies the same."""
        return {o.path: o.sha256 for o in self.marker.outputs}


def find_markers(sources: list[SourceDir]) -> tuple[list[FoundMarker], list[str]]:
    """Every embed task marker under ``sources`` (one batched read per source), and a
    problem for each unreadable one. Other stages' markers (a synced run dir) are skipped."""
    found: list[FoundMarker] = []
    problems: list[str] = []
    for src in sources:
        names = sorted(n for n in src.files if SYNCED_MARKER.fullmatch(n))
        blobs = src.storage.read_many(names)
        for name in names:
            url = src.storage.url(name)
            try:
                marker = parse_marker(blobs[name], url)
            except (InvalidMarkerError, KeyError) as exc:
                problems.append(f"{src.describe()}: {exc}")
                continue
            if marker.stage != EMBED_STAGE or marker.part is not None:
                log.info("%s: a marker of stage %s, not an embed task: skipped", url, marker.stage)
                continue
            match = SYNCED_MARKER.fullmatch(name)
            assert match is not None
            found.append(FoundMarker(src, name, marker, match.group(1) or ""))
    return found, problems


def _agreement(found: list[FoundMarker], expected_hash: str | None) -> list[str]:
    """One config hash (``expected_hash`` when given) and one task count for all markers."""
    problems: list[str] = []
    first_of_hash: dict[str, FoundMarker] = {}
    for f in found:
        first_of_hash.setdefault(f.marker.config_hash, f)
    if len(first_of_hash) > 1:
        (ha, a), (hb, b) = list(first_of_hash.items())[:2]
        problems.append(
            f"the synced shards come from different embed configurations: {a.source.label} "
            f"({a.url}) has config hash {ha[:12]}, {b.source.label} ({b.url}) has "
            f"{hb[:12]}; sync the shards of one embed run only "
            "(same model, dataset and embed settings on every host)"
        )
    elif expected_hash is not None and found and found[0].marker.config_hash != expected_hash:
        a = found[0]
        problems.append(
            f"{a.source.label} ({a.url}) was written under embed config hash "
            f"{a.marker.config_hash[:12]}, but this run's embed stage hashes to "
            f"{expected_hash[:12]}: the hosts embedded with other settings (model, dataset, "
            "embed.*); use the same config, or leave embed out of stages"
        )
    first_of_count: dict[int, FoundMarker] = {}
    for f in found:
        first_of_count.setdefault(f.marker.num_tasks, f)
    if len(first_of_count) > 1:
        (na, a), (nb, b) = list(first_of_count.items())[:2]
        problems.append(
            f"the synced markers disagree on the number of embed tasks: {a.source.label} "
            f"({a.url}) says {na}, {b.source.label} ({b.url}) says {nb}; "
            "sync the shards of one embed run only"
        )
    return problems


def _one_per_task(found: list[FoundMarker]) -> tuple[dict[int, FoundMarker], list[str]]:
    """Each task's marker; a problem for a task whose copies differ, and for missing ones."""
    problems: list[str] = []
    chosen: dict[int, FoundMarker] = {}
    num_tasks = found[0].marker.num_tasks
    for f in found:
        task = f.marker.task
        if not 0 <= task < num_tasks:
            problems.append(f"{f.url}: task {task} outside 0..{num_tasks - 1} (num_tasks)")
            continue
        other = chosen.get(task)
        if other is None:
            chosen[task] = f
            continue
        if other.recorded() == f.recorded():
            log.info("task %d is on %s and %s, identical: using the first", task, other.url, f.url)
            continue
        a, b = other.recorded(), f.recorded()
        differ = sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))
        what = ", ".join(
            f"{p.rsplit('/', 1)[-1]}: sha256 {str(a.get(p))[:12]} vs {str(b.get(p))[:12]}"
            for p in differ[:3]
        )
        problems.append(
            f"task {task} is on {other.source.label} ({other.url}) and on "
            f"{f.source.label} ({f.url}) with different contents ({what}): keep the copy "
            "of the host that embedded it and delete the other"
        )
    missing = sorted(set(range(num_tasks)) - set(chosen))
    if missing:
        problems.insert(
            0,
            f"{len(missing)} of {num_tasks} embed task(s) are on no source: tasks "
            f"{compress_indices(missing)}; sync them from the host(s) that embedded them "
            "(or finish them there first)",
        )
    return chosen, problems


def _marked(f: FoundMarker) -> MarkedShard | str:
    """The shard of ``f`` with its marker's outputs renamed to the local files (or the
    problem when the marker names a file outside an embed stage dir)."""
    outputs = []
    for o in f.marker.outputs:
        local = f.local(o.path)
        if local is None:
            return f"{f.url}: names {o.path}, which is not a file of an embed stage dir"
        outputs.append(OutputFile(local, o.bytes, o.sha256))
    own = RunPaths.embed_shard(f.marker.task)
    names = [f.local(n) or n for n in own.all()]
    fix = f"sync it again from {f.source.label}: delete the file and rerun with stages=[sync,merge]"
    return MarkedShard(
        f.marker.task,
        f.name,
        dataclasses.replace(f.marker, outputs=outputs),
        ShardFiles(*names),
        source=f.source.name,
        fix=fix,
    )


def collect_synced_shards(
    sources: list[SourceDir], expected_hash: str | None = None
) -> list[ShardInput]:
    """Every embed shard synced into ``sources``, checked against its producer's marker.
    ``expected_hash``: the planned embed stage's hash, when the plan has one. Raises
    ``ShardValidationError`` with every problem, naming the sources and files."""
    found, problems = find_markers(sources)
    if not found and not problems:
        where = ", ".join(s.describe() for s in sources) or "no source dir"
        raise refused(
            [
                f"merge.input=synced: no embed completion marker (completions/task_XXXXX.json) "
                f"in {where}: sync each host's embed stage dir (shards/ and completions/, "
                "layout kept), not only its shard files"
            ]
        )
    problems += _agreement(found, expected_hash)
    if problems:
        raise refused(problems)
    chosen, problems = _one_per_task(found)
    if problems:
        raise refused(problems)
    inputs: list[ShardInput] = []
    by_storage: dict[int, list[MarkedShard]] = {}
    stores = {}
    sizes: dict[int, dict[str, int]] = {}
    for task in sorted(chosen):
        f = chosen[task]
        shard = _marked(f)
        if isinstance(shard, str):
            problems.append(shard)
            continue
        key = id(f.source.storage)
        stores[key] = f.source.storage
        by_storage.setdefault(key, []).append(shard)
        sizes.setdefault(key, {}).update(f.source.files)
    for key, shards in by_storage.items():
        ok, bad = check_marked_shards(stores[key], shards, sizes[key])
        inputs += ok
        problems += bad
    if problems:
        raise refused(problems)
    refuse_all_dropped(inputs, ", ".join(s.url for s in sources))
    return inputs
