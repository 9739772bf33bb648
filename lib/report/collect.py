"""What a run's files say, for the report: markers per stage, the merged rows and their
sources, dropped rows, k-means assignments, metrics, the curated subset, and texts read
back from the run's dataset.

Only files are read (never another stage's package). A section whose files are missing
is left out (``None``); a file that exists but cannot be read is an error naming it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from lib.core.errors import DatasetError
from lib.core.paths import RunPaths
from lib.formats.arrays import read_npy
from lib.formats.parquet import read_table
from lib.plan.spec import Plan, StageSpec

log = logging.getLogger(__name__)


@dataclass
class StageFacts:
    """One stage of the plan, from its completion markers."""

    name: str
    group: str
    tasks: int
    done: int = 0
    wall_seconds: float | None = None  # first task start to last task end
    task_seconds: float = 0.0  # summed over tasks
    rows: int | None = None
    tokens: int | None = None
    peak_rss_bytes: int | None = None  # the largest task's (own or children)
    peak_cuda_bytes: int | None = None
    cpu_seconds: float | None = None

    @property
    def rows_per_second(self) -> float | None:
        return self.rows / self.wall_seconds if self.rows and self.wall_seconds else None

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.wall_seconds if self.tokens and self.wall_seconds else None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def stage_facts(paths: RunPaths, spec: StageSpec) -> StageFacts:
    """``spec``'s figures from whatever markers it has (any config hash: this only shows)."""
    facts = StageFacts(spec.name, spec.group, spec.num_tasks)
    names = [paths.marker(spec.stage_dir, t) for t in range(spec.num_tasks)]
    starts, ends = [], []
    rows = tokens = 0
    for blob in paths.storage.read_many(names).values():
        try:
            m = json.loads(blob)
        except ValueError:
            continue
        facts.done += 1
        wall, end = _num(m.get("wall_seconds")), _num(m.get("finished_at"))
        if wall is not None:
            facts.task_seconds += wall
            if end is not None:
                starts.append(end - wall)
                ends.append(end)
        counts = m.get("counts") or {}
        rows += int(_num(counts.get("embedded", counts.get("rows"))) or 0)
        tokens += int(_num(counts.get("tokens")) or 0)
        rss = [_num(m.get(k)) for k in ("peak_rss_bytes", "peak_rss_children_bytes")]
        rss = [int(v) for v in rss if v is not None]
        if rss:
            facts.peak_rss_bytes = max([*rss, facts.peak_rss_bytes or 0])
        cuda = _num(m.get("peak_cuda_bytes"))
        if cuda is not None:
            facts.peak_cuda_bytes = max(int(cuda), facts.peak_cuda_bytes or 0)
        cpu = _num(m.get("cpu_seconds"))
        if cpu is not None:
            facts.cpu_seconds = (facts.cpu_seconds or 0.0) + cpu
    if starts:
        facts.wall_seconds = max(ends) - min(starts)
    facts.rows = rows or None
    facts.tokens = tokens or None
    return facts


@dataclass
class RunInfo:
    experiment: str
    run_name: str
    dataset: str
    model: str
    launcher: str
    root: str
    stages: list[StageFacts]


def run_info(paths: RunPaths, cfg: DictConfig, plan: Plan) -> RunInfo:
    def get(key: str, default: str = "") -> str:
        value = OmegaConf.select(cfg, key, default=None)
        return default if value is None else str(value)

    experiment = get("description") or get("run.name")
    dataset = f"{get('dataset.name')} ({get('dataset.path')})"
    model = get("model.name") or get("model.path")
    return RunInfo(
        experiment,
        get("run.name"),
        dataset,
        model,
        get("cluster.launcher", "local"),
        paths.root,
        [stage_facts(paths, s) for s in plan.stages if s.group != "report"],
    )


@dataclass
class MergedRows:
    """The merged matrix's rows: dataset row, id and source of each (metadata.parquet)."""

    row_index: np.ndarray  # (N,) int64, the original dataset row of each merged row
    ids: list[str]
    codes: np.ndarray  # (N,) int32 source code of each row
    sources: list[str]  # code -> source name

    @property
    def rows(self) -> int:
        return len(self.row_index)

    def source_counts(self, rows: np.ndarray | None = None) -> np.ndarray:
        codes = self.codes if rows is None else self.codes[rows]
        return np.bincount(codes, minlength=len(self.sources))


def merged_rows(paths: RunPaths) -> MergedRows | None:
    """The merge's metadata (None when there is no merge output)."""
    storage = paths.storage
    if not storage.exists(paths.merge_metadata):
        return None
    table = read_table(storage, paths.merge_metadata, ["row_index", "id", "source"])
    source = pc.cast(table.column("source"), pa.string()).combine_chunks()
    encoded = source.dictionary_encode()
    codes = np.asarray(encoded.indices.fill_null(0), dtype=np.int32)
    sources = [str(s) for s in encoded.dictionary.to_pylist()] or ["(none)"]
    ids = [str(x) for x in table.column("id").to_pylist()]
    return MergedRows(np.asarray(table.column("row_index"), dtype=np.int64), ids, codes, sources)


def dropped_rows(paths: RunPaths) -> pa.Table | None:
    if not paths.storage.exists(paths.merge_dropped):
        return None
    return read_table(paths.storage, paths.merge_dropped)


@dataclass
class Level:
    level: int
    assignment: np.ndarray  # (N,) the cluster of every merged row at this level
    n_clusters: int
    metrics: dict | None = None  # metrics/level{L}/metrics.json
    examples: list[dict] = field(default_factory=list)  # metrics/level{L}/examples.json


def kmeans_levels(paths: RunPaths, max_levels: int = 64) -> list[Level]:
    """Each finished k-means level's assignment of every merged row (level L composes
    level L-1's), with the level's metrics when the metrics stage ran. Levels are found
    by their ``final.json`` (1, 2, ... up to the first missing), not by the plan, so a
    report launched alone still sees them."""
    storage = paths.storage
    out: list[Level] = []
    per_row: np.ndarray | None = None
    for level in range(1, max_levels + 1):
        final = storage.read_json(paths.kmeans_final(level))
        if final is None:
            break
        step = paths.kmeans_step(level, str(final["step"]))
        assignment = np.asarray(read_npy(storage, step.array("assignment")), dtype=np.int64)
        per_row = assignment if per_row is None else assignment[per_row]
        item = Level(level, per_row, int(final.get("n_clusters") or per_row.max() + 1))
        item.metrics = storage.read_json(paths.metrics_file(level, "metrics.json"))
        item.examples = storage.read_json(paths.metrics_file(level, "examples.json")) or []
        out.append(item)
    return out


def curated_rows(paths: RunPaths) -> np.ndarray | None:
    """The merged rows of the curated subset (None without a curate output)."""
    name = paths.curated_file("embedding_rows.npy")
    if not paths.storage.exists(name):
        return None
    return np.asarray(read_npy(paths.storage, name), dtype=np.int64)


def merge_report(paths: RunPaths) -> dict | None:
    return paths.storage.read_json(paths.merge_report)


def merged_matrix(paths: RunPaths, cfg: DictConfig) -> tuple[str, np.ndarray] | None:
    """(name, read-only memory map) of the merged embeddings, None without them."""
    from lib.formats.arrays import open_embeddings

    formats = [str(f) for f in cfg.merge.formats] or ["safetensors"]
    for fmt in [*formats, "safetensors", "npy"]:
        try:
            name = paths.merge_embeddings(fmt)
        except Exception:  # an unknown format name
            continue
        if paths.storage.exists(name):
            return name, open_embeddings(paths.storage.local_path(name))
    return None


# The columns ``dataset.keep_text`` puts in metadata.parquet: the embedded text, or a chat
# run's parts (shown as prompt, then response).
TEXT_COLUMN, CHAT_COLUMNS = "text", ("user_prompt", "response_text")


def metadata_text_columns(paths: RunPaths) -> tuple[list[str], str] | None:
    """The columns of ``merge/metadata.parquet`` that hold each row's text (and how they
    join), or None when the run kept no text there (``dataset.keep_text=false``)."""
    if not paths.storage.exists(paths.merge_metadata):
        return None
    with paths.storage.open(paths.merge_metadata) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    if TEXT_COLUMN in names:
        return [TEXT_COLUMN], ""
    if all(c in names for c in CHAT_COLUMNS):
        return list(CHAT_COLUMNS), "\n\n"
    return None


def metadata_texts(paths: RunPaths, positions: np.ndarray, cols: list[str], sep: str) -> list[str]:
    """Texts of the merged rows at ``positions`` (sorted, unique) from the metadata's
    ``cols``, reading only the row groups that hold them."""
    out: list[str] = []
    with paths.storage.open(paths.merge_metadata) as f:
        pf = pq.ParquetFile(f)
        start = 0
        for g in range(pf.num_row_groups):
            stop = start + pf.metadata.row_group(g).num_rows
            here = positions[(positions >= start) & (positions < stop)]
            if len(here):
                table = pf.read_row_group(g, columns=cols)
                columns = [table.column(c).take(pa.array(here - start)).to_pylist() for c in cols]
                out += [sep.join(str(v) for v in vals if v) for vals in zip(*columns, strict=True)]
            start = stop
    return out


class TextReader:
    """Texts of dataset rows: from the merge's metadata when the run kept them there
    (``dataset.keep_text``: exactly what was embedded), else rebuilt from the dataset as
    the run built them (``lib.data``), read once per batch; a dataset that cannot be read
    any more leaves texts empty and says why (``problem``)."""

    def __init__(
        self, cfg: DictConfig, paths: RunPaths | None = None, merged: MergedRows | None = None
    ) -> None:
        self.cfg = cfg
        self.problem: str | None = None
        self.paths, self.merged = paths, merged
        self.columns = metadata_text_columns(paths) if paths is not None and merged else None

    def texts(self, dataset_rows: np.ndarray) -> dict[int, str]:
        rows = np.unique(np.asarray(dataset_rows, dtype=np.int64))
        if not len(rows):
            return {}
        if self.columns is not None and self.paths is not None and self.merged is not None:
            index = self.merged.row_index
            order = np.argsort(index, kind="stable")
            at = np.searchsorted(index[order], rows)
            ok = (at < len(index)) & (index[order][np.minimum(at, len(index) - 1)] == rows)
            positions = order[at[ok]]
            by_position = np.argsort(positions, kind="stable")
            texts = metadata_texts(self.paths, positions[by_position], *self.columns)
            found = rows[ok][by_position]
            return {int(r): t for r, t in zip(found, texts, strict=True)}
        if self.problem is not None:
            return {}
        from lib.data.columns import needed_columns, open_dataset
        from lib.data.params import TextMode
        from lib.data.text import TextDecoding, build_texts

        d = self.cfg.dataset
        try:
            source = open_dataset(self.cfg)
            table = source.take(rows, needed_columns(self.cfg, source.columns))
            dec = TextDecoding(
                d.encoding,
                d.encoding_errors,
                bool(d.cast_text),
                source.description,
                int(rows[0]),
                tuple(int(r) for r in rows),
            )
            texts = build_texts(
                table, TextMode(d.text_mode), d.text_field, d.template, d.chat, "", dec
            )
        except (DatasetError, OSError, ValueError, KeyError) as exc:
            self.problem = f"the dataset could not be read back ({exc}); texts are not shown"
            log.warning("report: %s", self.problem)
            return {}
        return {int(r): (t or "") for r, t in zip(rows, texts, strict=True)}
