"""``launch.py search RUN_DIR "some text"``: the nearest rows of a run's index.

    python launch.py search RUN_DIR "some text" [-k 10] [--json]
    python launch.py search RUN_DIR --row N        the neighbours of dataset row N
    python launch.py search RUN_DIR --file queries.txt   one query a line, embedded in batches

Queries are embedded with the run's own model, pooling, normalization and dimensions, with
the model's query prompt in front (``lib.embed.query``); ``--row`` searches with the row's
stored vector (read from the merged embeddings, exact for every index kind). Each hit
prints its rank, score (inner product, or squared L2 distance), id, source and the first
line of its text, read back from the run's dataset. Errors name what is wrong and the
fix: a run without an index gets the command that builds one, a damaged index file the
command that rebuilds it, a ``--model`` other than the run's is refused.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cli.argtypes import dataset_row, positive
from lib.core.errors import ConfigError, DatasetError, EmbedfleetError, ModelError
from lib.core.paths import RunPaths
from lib.plan.spec import Plan

TEXT_WIDTH = 100
BATCH = 256  # queries of --file embedded at once


def add_search_parser(add: Callable[..., argparse.ArgumentParser], run_help: str) -> None:
    """The ``search`` subcommand (``add`` is ``cli.commands``' helper)."""
    s = add(
        "search",
        "the nearest rows of the run's index to a text, a row or a file of queries",
        "Embed QUERY with the run's own model (pooling, prefix and the model's query "
        "prompt) and print the k nearest rows of the run's index (stage index): rank, "
        "score, id, source and the first line of the row's text. --row N searches with "
        "dataset row N's stored vector; --file runs one query per line, in batches.",
        "exit codes: 0 results printed; 1 the command failed (no index, a damaged index, "
        "another model, ...); 2 bad arguments",
    )
    s.add_argument("run", help=run_help)
    s.add_argument("query", nargs="?", default=None, help="the text to search for")
    s.add_argument("-k", type=positive, default=10, help="results per query (default: 10)")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.add_argument("--row", type=dataset_row, default=None, help="neighbours of dataset row N")
    s.add_argument("--file", type=Path, default=None, help="a file of queries, one a line")
    s.add_argument("--nprobe", type=positive, default=None, help="IVF lists to search")
    s.add_argument("--ef-search", type=positive, default=None, help="HNSW efSearch")
    s.add_argument(
        "--model",
        default=None,
        help="the model the queries must be embedded with: only the run's own is accepted",
    )
    s.add_argument(
        "--device", default="auto", help="where the query model runs: auto, cpu, cuda, ..."
    )
    s.set_defaults(fn=cmd_search)


def _queries(args: argparse.Namespace) -> list[str] | None:
    """The query texts (None for ``--row``). Raises ``ConfigError`` for no or several
    inputs, an empty query, an unreadable or empty file."""
    given = [x is not None for x in (args.query, args.row, args.file)]
    if sum(given) != 1:
        raise ConfigError(
            "search needs exactly one of: a QUERY text, --row N or --file FILE (e.g. "
            f'python launch.py search {args.run} "some text")'
        )
    if args.row is not None:
        return None
    if args.query is not None:
        if not args.query.strip():
            raise ConfigError("the query is empty: give the text to search for")
        return [args.query]
    try:
        lines = args.file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--file {args.file}: cannot read it ({exc})") from None
    queries = [line.strip() for line in lines if line.strip()]
    if not queries:
        raise ConfigError(f"--file {args.file} has no queries (one a line, blank lines skipped)")
    return queries


def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def build_command(cfg: DictConfig, plan: Plan) -> str:
    """The launch that adds the index stage to the run: its own overrides (``plan.json``
    keeps them), its run dir, and its stages plus ``index`` (finished ones are skipped)."""
    stages = [g for g in dict.fromkeys(s.group for s in plan.stages) if g != "index"]
    tail = [
        f"run.root={cfg.run.root}",
        f"run.name={cfg.run.name}",
        f"stages=[{','.join([*stages, 'index'])}]",
    ]
    overrides = plan.extra.get("overrides")
    if overrides is None:
        return "python launch.py <the overrides this run was launched with> " + shlex.join(tail)
    keep = [o for o in overrides if _key(o) not in ("stages", "run.root", "run.name")]
    return shlex.join(["python", "launch.py", *keep, *tail])


def first_line(text: str | None) -> str:
    """The first non-blank line of ``text``, cut to ``TEXT_WIDTH`` characters."""
    line = next((x.strip() for x in (text or "").splitlines() if x.strip()), "")
    return line if len(line) <= TEXT_WIDTH else line[: TEXT_WIDTH - 3] + "..."


def row_texts(cfg: DictConfig, rows: list[int]) -> dict[int, str]:
    """The text of each dataset row, as the run built it (without the document prefix).
    Raises ``DatasetError`` when the dataset cannot be read."""
    from lib.data.columns import needed_columns, open_dataset
    from lib.data.params import TextMode
    from lib.data.text import TextDecoding, build_texts

    d = cfg.dataset
    source = open_dataset(cfg)
    columns = needed_columns(cfg, source.columns)
    out: dict[int, str] = {}
    for row in sorted(set(rows)):
        table = source.read(row, row + 1, columns)
        dec = TextDecoding(
            d.encoding, d.encoding_errors, bool(d.cast_text), source.description, row
        )
        texts = build_texts(table, TextMode(d.text_mode), d.text_field, d.template, d.chat, "", dec)
        out[row] = texts[0] or ""
    return out


def _load(args: argparse.Namespace):
    from cli.run import resolve_run
    from lib.config.compose import load_run_config
    from lib.core.storage import expand_scratch

    paths = resolve_run(args.run)
    cfg = load_run_config(paths)
    paths = RunPaths(paths.root, expand_scratch(cfg.cluster.scratch_dir))
    return paths, cfg, Plan.load(paths)


def _check_model(args: argparse.Namespace, cfg: DictConfig) -> None:
    if args.model is None:
        return
    own = {str(cfg.model.name), str(cfg.model.path)}
    if args.model not in own:
        raise ModelError(
            f"--model {args.model}: this run's index holds vectors of model "
            f"{cfg.model.name} ({cfg.model.path}); queries embedded with another model are "
            "not comparable with them. Search with the run's model (leave out --model), or "
            f"build an index of a run embedded with {args.model}"
        )


def _search_results(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Everything ``search`` prints: the JSON-able result and the notes for stderr."""
    from lib.index.search import (
        IndexMissingError,
        apply_settings,
        faiss_id_of_row,
        load_index,
        search,
        stored_vectors,
    )

    queries = _queries(args)
    paths, cfg, plan = _load(args)
    _check_model(args, cfg)
    try:
        loaded = load_index(paths)
    except IndexMissingError as exc:
        raise IndexMissingError(
            f"{exc}. Build it (the finished stages are skipped):\n  {build_command(cfg, plan)}"
        ) from None
    apply_settings(loaded.index, loaded.settings, nprobe=args.nprobe, ef_search=args.ef_search)
    notes: list[str] = []
    if queries is None:
        fid = faiss_id_of_row(loaded, args.row)
        if fid is None:
            raise DatasetError(
                f"dataset row {args.row} is not in the index: it was not embedded (dropped: "
                f"see {paths.url(paths.merge_dropped)}) or is outside the run's "
                f"{plan.dataset_rows or loaded.index.ntotal} rows"
            )
        vectors = stored_vectors(paths, loaded, [fid])
        labels: list[dict[str, Any]] = [{"row": args.row}]
    else:
        from lib.embed.query import QueryEmbedder

        embedder = QueryEmbedder(cfg.model, cfg.embed, args.device)
        if embedder.dim != loaded.dim:
            raise ModelError(
                f"model {cfg.model.name} ({cfg.model.path}) now embeds to {embedder.dim} "
                f"dimensions but the index holds {loaded.dim}: the model changed since the "
                "run; search with the model the run used"
            )
        parts = []
        for a in range(0, len(queries), BATCH):
            q = embedder.embed(queries[a : a + BATCH])
            parts.append(q.vectors)
            if q.truncated:
                notes.append(
                    f"note: {q.truncated} query(ies) longer than model.max_length="
                    f"{cfg.model.max_length} tokens were cut to it"
                )
        import numpy as np

        vectors = np.concatenate(parts)
        labels = [{"query": q} for q in queries]
    hits = search(loaded, vectors, args.k)
    try:
        texts = row_texts(cfg, [h.row_index for hs in hits for h in hs])
    except (EmbedfleetError, OSError, ValueError) as exc:
        notes.append(f"note: texts not shown: the dataset could not be read ({exc})")
        texts = {}
    results = []
    for label, found in zip(labels, hits, strict=True):
        rows = [{**h.to_json(), "text": first_line(texts.get(h.row_index))} for h in found]
        results.append({**label, "hits": rows})
    layout = loaded.settings
    header = {
        "run": paths.root,
        "index": {
            "kind": layout.get("kind"),
            "metric": layout.get("metric"),
            "vectors": int(loaded.index.ntotal),
        },
        "k": args.k,
        "results": results,
    }
    return header, notes


def render(result: dict[str, Any]) -> str:
    """The results as plain text: one block per query."""
    index = result["index"]
    score = "score" if index["metric"] == "ip" else "dist²"
    lines = []
    for block in result["results"]:
        what = f"row {block['row']}" if "row" in block else json.dumps(block["query"])
        lines.append(
            f"{what}: {len(block['hits'])} nearest of {index['vectors']} ({index['kind']}, "
            f"{index['metric']})"
        )
        lines.append(f"{'rank':>5}  {score:>8}  {'id':<24} {'source':<16} text")
        for h in block["hits"]:
            lines.append(
                f"{h['rank']:>5}  {h['score']:>8.4f}  {h['id']:<24} {h['source']:<16} {h['text']}"
            )
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def cmd_search(args: argparse.Namespace) -> int:
    result, notes = _search_results(args)
    for note in notes:
        print(note, file=sys.stderr)
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else render(result))
    return 0
