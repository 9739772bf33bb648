"""The report task: read what the run's stages left, compute the figures with bounded
memory, publish ``report/index.html`` (one self-contained file), then the marker naming
it with its sha256.

Sections appear only for stages whose outputs exist: Run (always), Embeddings (merge),
Clustering (k-means, metrics), Curation (curate), Activations (extract: its merged
``extract/metadata.json``).
``launch.py report RUN_DIR`` calls ``write_report`` too, replacing an earlier page and its
marker.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from omegaconf import DictConfig

from lib.core.markers import CompletionMarker, write_marker
from lib.core.paths import REPORT_DIR, RunPaths
from lib.formats.matrix_reader import MatrixReader
from lib.plan.spec import Plan
from lib.report import collect, figures
from lib.report.figures import plot_text
from lib.report.page import Block, Page, Section, render
from lib.report.params import ReportParams
from lib.report.pca import (
    component_scores,
    principal_components,
    project,
    streamed_moments,
)
from lib.report.plan import report_params
from lib.runtime.context import TaskContext

log = logging.getLogger(__name__)
MAX_HEATMAP_SOURCES = 60
MAX_BAR_SOURCES = 60
LONGEST_DROPPED = 5


@dataclass
class Inputs:
    """What the sections share: the run's config, plan, merged rows, the map sample."""

    paths: RunPaths
    cfg: DictConfig
    plan: Plan
    params: ReportParams
    rows: collect.MergedRows | None
    reader: collect.TextReader
    sample: np.ndarray | None = None  # merged rows on the maps
    xy: np.ndarray | None = None  # their PCA coordinates
    hover: list[str] = field(default_factory=list)
    levels: list[collect.Level] = field(default_factory=list)

    def texts(self, merged: np.ndarray) -> list[str]:
        """Texts of merged rows (in that order), '' where unknown."""
        if self.rows is None or not len(merged):
            return []
        dataset = self.rows.row_index[np.asarray(merged, dtype=np.int64)]
        found = self.reader.texts(dataset)
        return [found.get(int(r), "") for r in dataset]

    def short_hover(self) -> list[str]:
        """``[source] id`` of each map point, for the cluster maps (the source map has
        the texts)."""
        assert self.rows is not None and self.sample is not None
        rows = self.rows
        return [plot_text(f"[{rows.sources[rows.codes[r]]}] {rows.ids[r]}") for r in self.sample]

    def label(self, merged: int, text: str) -> str:
        """``[source] id: text``, cut to ``text_chars`` (plain text: the page escapes)."""
        assert self.rows is not None
        limit = self.params.text_chars
        body = text if len(text) <= limit else text[: limit - 1] + "…"
        source = self.rows.sources[self.rows.codes[merged]]
        return f"[{source}] {self.rows.ids[merged]}: {body}"


def sample_per_source(codes: np.ndarray, n_sources: int, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` rows, shared equally among sources (a source smaller than its
    share gives all its rows and the rest goes to the others), sorted."""
    counts = np.bincount(codes, minlength=n_sources)
    if counts.sum() <= limit:
        return np.arange(len(codes), dtype=np.int64)
    quota = np.zeros(n_sources, dtype=np.int64)
    left, order = limit, np.argsort(counts, kind="stable")
    for i, s in enumerate(order):
        take = min(int(counts[s]), left // (n_sources - i))
        quota[s], left = take, left - take
    rng = np.random.default_rng(seed)
    by_source = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    picked = [
        rng.choice(by_source[starts[s] : starts[s + 1]], size=quota[s], replace=False)
        for s in range(n_sources)
        if quota[s]
    ]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def _fmt(v: float | None, spec: str = ",.1f") -> str:
    return "-" if v is None else format(v, spec)


def run_section(page: Page, inp: Inputs) -> None:
    info = collect.run_info(inp.paths, inp.cfg, inp.plan)
    s = Section("run", "Run")
    page.sections.append(s)
    s.blocks.append(
        Block(
            "table",
            {
                "headers": ["", ""],
                "rows": [
                    ["experiment", info.experiment],
                    ["run", info.run_name],
                    ["dataset", info.dataset],
                    ["model", info.model],
                    ["launcher", info.launcher],
                    ["run dir", info.root],
                ],
            },
        )
    )
    headers = ["stage", "tasks done", "wall s", "rows", "rows/s", "tokens/s", "peak RSS",
               "peak CUDA", "CPU s"]  # fmt: skip
    table = [
        [
            f.name,
            f"{f.done}/{f.tasks}",
            _fmt(f.wall_seconds),
            "-" if f.rows is None else f"{f.rows:,}",
            _fmt(f.rows_per_second),
            _fmt(f.tokens_per_second),
            _mib(f.peak_rss_bytes),
            _mib(f.peak_cuda_bytes),
            _fmt(f.cpu_seconds),
        ]
        for f in info.stages
    ]
    s.blocks.append(Block("table", {"headers": headers, "rows": table}, "Stages"))
    with_usage = [f for f in info.stages if f.peak_rss_bytes is not None]
    if with_usage:
        names = [f.name for f in with_usage]
        fig = figures.bars(
            names,
            {"peak RSS (MiB)": [(f.peak_rss_bytes or 0) / 2**20 for f in with_usage]}
            | (
                {"peak CUDA (MiB)": [(f.peak_cuda_bytes or 0) / 2**20 for f in with_usage]}
                if any(f.peak_cuda_bytes for f in with_usage)
                else {}
            ),
            "Peak memory of a task, per stage",
            "MiB",
        )
        page.figure(s, "fig-memory", fig)
        cpu = [f.cpu_seconds or 0.0 for f in with_usage]
        page.figure(s, "fig-cpu", figures.bars(names, {"CPU s": cpu}, "CPU seconds per stage", "s"))
    dropped_block(page, s, inp)


def dropped_block(page: Page, s: Section, inp: Inputs) -> None:
    table = collect.dropped_rows(inp.paths)
    if table is None:
        return
    if table.num_rows == 0:
        s.blocks.append(Block("text", "Dropped rows: none.", "Dropped rows"))
        return
    reasons = table.column("reason").to_pylist()
    counts: dict[str, int] = {}
    for r in reasons:
        counts[str(r)] = counts.get(str(r), 0) + 1
    s.blocks.append(
        Block(
            "table",
            {"headers": ["reason", "rows"], "rows": [[k, v] for k, v in sorted(counts.items())]},
            "Dropped rows by reason",
        )
    )
    if "token_count" not in table.column_names:
        return
    tokens = np.asarray(table.column("token_count").fill_null(0), dtype=np.int64)
    if tokens.any():
        page.figure(
            s,
            "fig-dropped-tokens",
            figures.histogram(tokens, "Token counts of the dropped rows", "tokens", bins=40),
        )
    longest = np.argsort(-tokens, kind="stable")[:LONGEST_DROPPED]
    dataset_rows = np.asarray(table.column("row_index"), dtype=np.int64)[longest]
    found = inp.reader.texts(dataset_rows)
    ids = table.column("id").to_pylist()
    items = []
    for i, row in zip(longest, dataset_rows, strict=True):
        text = found.get(int(row), "")[: inp.params.text_chars]
        items.append(f"{ids[i]} ({reasons[i]}, {int(tokens[i]):,} tokens): {text}")
    s.blocks.append(Block("texts", [{"label": "The longest dropped rows", "items": items}]))


def embeddings_section(page: Page, inp: Inputs) -> None:
    found = collect.merged_matrix(inp.paths, inp.cfg)
    if found is None or inp.rows is None:
        return
    name, matrix = found
    rows, p = inp.rows, inp.params
    if int(matrix.shape[0]) != rows.rows:
        page.notes.append(
            f"{inp.paths.url(name)} has {matrix.shape[0]} rows but "
            f"{inp.paths.url(inp.paths.merge_metadata)} {rows.rows}: the Embeddings section "
            "is left out (rerun the merge stage)"
        )
        return
    if rows.rows < 2:
        return
    s = Section("embeddings", "Embeddings")
    page.sections.append(s)
    started = time.monotonic()
    moments = streamed_moments(matrix, p.block_rows, rows.codes, len(rows.sources))
    comps = principal_components(moments, min(p.pca_components, int(matrix.shape[1])))
    log.info(
        "streamed covariance of %d x %d in %.1fs",
        matrix.shape[0],
        matrix.shape[1],
        time.monotonic() - started,
    )
    page.figure(
        s,
        "fig-norms",
        figures.histogram(moments.norms, "L2 norms of the embeddings", "L2 norm"),
    )
    page.figure(s, "fig-scree", figures.scree(comps.explained))
    # The map: a per-source sample projected on the first two components.
    inp.sample = sample_per_source(rows.codes, len(rows.sources), p.max_points, p.seed)
    vectors = (
        MatrixReader(matrix).take(inp.sample)
        if isinstance(matrix, np.memmap)
        else (np.asarray(matrix[inp.sample], dtype=np.float32))
    )
    inp.xy = project(vectors, comps, 2)
    texts = inp.texts(inp.sample)
    inp.hover = [
        plot_text(inp.label(int(r), t))
        for r, t in zip(inp.sample, texts or [""] * len(inp.sample), strict=True)
    ]
    shown, total = len(inp.sample), rows.rows
    s.blocks.append(
        Block("count", {"figure": "fig-map", "shown": shown, "total": total, "what": "rows"})
    )
    page.figure(
        s,
        "fig-map",
        figures.source_map(
            inp.xy, rows.codes[inp.sample], rows.sources, inp.hover, "PCA map, coloured by source"
        ),
    )
    s.blocks.append(Block("pinned", "fig-map"))
    if p.umap:
        umap_block(page, s, inp, vectors)
    extremes_block(s, inp, matrix, comps)
    heatmap_block(page, s, inp, moments)


def umap_block(page: Page, s: Section, inp: Inputs, vectors: np.ndarray) -> None:
    import umap  # umap-learn: imported only when asked (numba compiles on first use)

    assert inp.rows is not None and inp.sample is not None
    n = len(vectors)
    if n < 4:
        page.notes.append(f"report.umap=true: {n} rows are too few for UMAP; map left out")
        return
    reducer = umap.UMAP(
        n_neighbors=min(inp.params.umap_neighbors, n - 1),
        random_state=inp.params.seed,
        n_components=2,
    )
    with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": wanted
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        xy = reducer.fit_transform(vectors)
    s.blocks.append(
        Block(
            "count",
            {"figure": "fig-umap", "shown": n, "total": inp.rows.rows, "what": "rows"},
        )
    )
    page.figure(
        s,
        "fig-umap",
        figures.source_map(
            np.asarray(xy),
            inp.rows.codes[inp.sample],
            inp.rows.sources,
            inp.hover,
            "UMAP map, coloured by source",
            ("UMAP 1", "UMAP 2"),
        ),
    )


def extremes_block(s: Section, inp: Inputs, matrix: np.ndarray, comps) -> None:
    p = inp.params
    k = min(p.pc_extremes, comps.vectors.shape[1])
    if k == 0:
        return
    scores = component_scores(matrix, comps, k, p.block_rows)
    n = min(p.extreme_texts, len(scores))
    groups = []
    picks = []
    for c in range(k):
        order = np.argsort(scores[:, c], kind="stable")
        picks.append((c, "highest", order[::-1][:n]))
        picks.append((c, "lowest", order[:n]))
    wanted = np.unique(np.concatenate([rows for _, _, rows in picks]))
    texts = dict(zip(wanted.tolist(), inp.texts(wanted), strict=True))
    for c, end, rows in picks:
        items = [f"{scores[r, c]:+.3f}  {inp.label(int(r), texts.get(int(r), ''))}" for r in rows]
        groups.append({"label": f"PC{c + 1}, {end} scores", "items": items})
    s.blocks.append(Block("texts", groups, "Texts at both ends of the first components"))


def heatmap_block(page: Page, s: Section, inp: Inputs, moments) -> None:
    assert inp.rows is not None and moments.source_sums is not None
    counts = inp.rows.source_counts()
    keep = np.argsort(-counts, kind="stable")[:MAX_HEATMAP_SOURCES]
    keep = keep[counts[keep] > 0]
    if len(keep) < 2:
        return
    means = moments.source_sums[keep] / counts[keep, None]
    unit = means / np.clip(np.linalg.norm(means, axis=1, keepdims=True), 1e-12, None)
    sim = unit @ unit.T
    if len(counts) > MAX_HEATMAP_SOURCES:
        s.blocks.append(
            Block("text", f"The {MAX_HEATMAP_SOURCES} largest of {len(counts)} sources.")
        )
    page.figure(
        s,
        "fig-source-similarity",
        figures.similarity_heatmap([inp.rows.sources[i] for i in keep], sim),
    )


def clustering_section(page: Page, inp: Inputs) -> None:
    inp.levels = collect.kmeans_levels(inp.paths) if inp.rows is not None else []
    if not inp.levels:
        return
    s = Section("clustering", "Clustering")
    page.sections.append(s)
    sizes = {
        f"level {lv.level} ({lv.n_clusters} clusters)": np.bincount(
            lv.assignment, minlength=lv.n_clusters
        )
        for lv in inp.levels
    }
    page.figure(s, "fig-cluster-sizes", figures.size_distribution(sizes, "Cluster sizes per level"))
    keys = ["n_points", "n_clusters", "n_empty", "inertia", "davies_bouldin",
            "calinski_harabasz", "silhouette", "silhouette_method", "simplified_silhouette"]  # fmt: skip
    with_metrics = [lv for lv in inp.levels if lv.metrics]
    if with_metrics:
        table = [
            [lv.level, *(_cell(lv.metrics.get(k)) for k in keys)]  # type: ignore[union-attr]
            for lv in with_metrics
        ]
        s.blocks.append(Block("table", {"headers": ["level", *keys], "rows": table}, "Metrics"))
    for lv in with_metrics:
        examples_block(s, inp, lv)
    if inp.xy is not None and inp.sample is not None:
        for lv in inp.levels[:2]:
            fig_id = f"fig-map-level{lv.level}"
            s.blocks.append(
                Block(
                    "count",
                    {
                        "figure": fig_id,
                        "shown": len(inp.sample),
                        "total": inp.rows.rows,  # type: ignore[union-attr]
                        "what": "rows",
                    },
                )
            )
            page.figure(
                s,
                fig_id,
                figures.cluster_map(
                    inp.xy,
                    lv.assignment[inp.sample],
                    inp.short_hover(),
                    f"PCA map, coloured by level-{lv.level} cluster",
                    ("PC1", "PC2"),
                ),
            )


def _cell(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else v


def examples_block(s: Section, inp: Inputs, lv: collect.Level) -> None:
    if not lv.examples or inp.rows is None:
        return
    merged = np.unique(
        [
            int(r["row"])
            for e in lv.examples
            for r in e.get("rows", [])
            if 0 <= int(r["row"]) < inp.rows.rows
        ]
    )
    texts = dict(zip(merged.tolist(), inp.texts(merged), strict=True))
    groups = []
    for e in lv.examples:
        sil = e.get("silhouette")
        head = (
            f"{str(e.get('kind', '')).replace('_', ' ')} #{e.get('rank')}: cluster "
            f"{e.get('cluster')}, {e.get('size')} rows, mean sq. distance "
            f"{_cell(e.get('mean_sq_distance'))}, silhouette {_cell(sil)}"
        )
        items = [
            inp.label(int(r["row"]), texts.get(int(r["row"]), ""))
            for r in e.get("rows", [])
            if int(r["row"]) in texts
        ]
        groups.append({"label": head, "items": items})
    s.blocks.append(Block("texts", groups, f"Level {lv.level}: best and worst clusters"))


def curation_section(page: Page, inp: Inputs) -> None:
    curated = collect.curated_rows(inp.paths)
    if curated is None or inp.rows is None:
        return
    s = Section("curation", "Curation")
    page.sections.append(s)
    rows = inp.rows
    full = rows.source_counts()
    sub = rows.source_counts(curated)
    order = np.argsort(-full, kind="stable")[:MAX_BAR_SOURCES]
    s.blocks.append(
        Block(
            "text",
            f"The curated subset has {len(curated):,} rows ({len(np.unique(curated)):,} distinct) "
            f"of {rows.rows:,}.",
        )
    )
    page.figure(
        s,
        "fig-curated-sources",
        figures.bars(
            [plot_text(rows.sources[i], 40) for i in order],
            {
                "full set": (full[order] / max(full.sum(), 1)).tolist(),
                "curated": (sub[order] / max(sub.sum(), 1)).tolist(),
            },
            "Source distribution: curated subset vs the full set",
            "fraction of rows",
        ),
    )
    if inp.levels:
        lv = inp.levels[0]
        page.figure(
            s,
            "fig-curated-clusters",
            figures.size_distribution(
                {
                    "full set": np.bincount(lv.assignment, minlength=lv.n_clusters),
                    "curated": np.bincount(lv.assignment[curated], minlength=lv.n_clusters),
                },
                f"Level-{lv.level} cluster sizes before and after curation",
            ),
        )


def activations_section(page: Page, inp: Inputs) -> None:
    """The extract stage's totals and, per task, samples, tokens, shards and bytes (from
    ``extract/metadata.json``, which ``extract_metadata`` checked against the markers)."""
    storage = inp.paths.storage
    if not storage.exists(inp.paths.extract_metadata):
        return
    meta = storage.read_json(inp.paths.extract_metadata)
    tasks = list(meta.get("tasks") or [])
    s = Section("activations", "Activations")
    page.sections.append(s)
    layers = ", ".join(str(x) for x in meta.get("layers") or [])
    s.blocks.append(
        Block(
            "text",
            f"{meta.get('model', '?')}: layers {layers}, {meta.get('dtype', '?')}, "
            f"{meta.get('packing', '?')} to {meta.get('max_seq_length', '?')} tokens; "
            f"{int(meta.get('samples', 0)):,} samples, {int(meta.get('tokens', 0)):,} tokens "
            f"in {int(meta.get('shards', 0)):,} shards, {int(meta.get('bytes', 0)) / 1e6:,.1f} "
            f"MB ({meta.get('compression', 'none')}) over {len(tasks)} task(s).",
        )
    )
    headers = ["task", "samples", "tokens", "shards", "MB"]
    table = [
        [
            t["task"],
            f"{t['samples']:,}",
            f"{t['tokens']:,}",
            t["shards"],
            f"{t['bytes'] / 1e6:,.1f}",
        ]
        for t in tasks
    ]
    s.blocks.append(Block("table", {"headers": headers, "rows": table}, "Per task"))
    labels = [f"task {t['task']}" for t in tasks]
    page.figure(
        s,
        "fig-activation-tokens",
        figures.bars(labels, {"tokens": [t["tokens"] for t in tasks]}, "Tokens per task", "tokens"),
    )
    page.figure(
        s,
        "fig-activation-bytes",
        figures.bars(
            labels, {"MB": [t["bytes"] / 1e6 for t in tasks]}, "Bytes written per task", "MB"
        ),
    )


# Each builder adds its section when the run has the outputs it reads.
SECTIONS: tuple[Callable[[Page, Inputs], None], ...] = (
    run_section,
    embeddings_section,
    clustering_section,
    curation_section,
    activations_section,
)


def build_page(paths: RunPaths, cfg: DictConfig, plan: Plan, params: ReportParams) -> Page:
    """Every section the run's outputs allow (see the module doc)."""
    merged = collect.merged_rows(paths)
    inp = Inputs(paths, cfg, plan, params, merged, collect.TextReader(cfg, paths, merged))
    page = Page(
        f"embedfleet report: {cfg.run.name}",
        str(cfg.description or ""),
    )
    for section in SECTIONS:
        section(page, inp)
    if inp.reader.problem:
        page.notes.append(inp.reader.problem)
    return page


def write_report(
    paths: RunPaths,
    cfg: DictConfig,
    plan: Plan,
    params: ReportParams,
    *,
    config_hash: str,
    stage: str = "report",
) -> CompletionMarker:
    """Build and publish ``report/index.html``, then its marker (an earlier marker is
    replaced: the page is redrawn from the run's current outputs). Returns the marker.
    Raises ``DatasetError``/``ArrayFormatError`` naming a run file that cannot be read."""
    started = time.monotonic()
    page = build_page(paths, cfg, plan, params)
    html_bytes = render(page).encode("utf-8")
    storage = paths.storage
    output = storage.publish_bytes(paths.report_page, html_bytes)
    name = paths.marker(REPORT_DIR, 0)
    if storage.exists(name):
        storage.remove(name)
    marker = CompletionMarker(
        stage=stage,
        task=0,
        num_tasks=1,
        config_hash=config_hash,
        counts={"bytes": len(html_bytes), "figures": len(page.figures)},
        outputs=[output],
        extra={"sections": [s.id for s in page.sections]},
        wall_seconds=time.monotonic() - started,
    )
    write_marker(storage, name, marker)
    log.info(
        "report: %s (%d sections) in %.1fs",
        paths.url(paths.report_page),
        len(page.sections),
        marker.wall_seconds,
    )
    return marker


def run(ctx: TaskContext) -> None:
    write_report(
        ctx.paths,
        ctx.cfg,
        ctx.plan,
        report_params(ctx.cfg),
        config_hash=ctx.spec.config_hash,
        stage=ctx.spec.name,
    )
