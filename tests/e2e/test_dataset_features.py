"""Dataset features through launch.py with the real MiniLM model: a seeded pilot sample of
a chat dataset (counts, row_index, conversation parts, the same for any number of tasks),
and a dataset that grows (embed.append) merged to the same bytes as a fresh run over all of
its rows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib.formats.arrays import open_embeddings
from tests.conftest import run_launch

pytestmark = pytest.mark.slow

SOURCES = ["wiki", "code", "chat", "math"]
BASE = ["embed.device=cpu", "model.max_length=64", "stages=[embed,merge]"]


def _ok(proc):
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _conversation(i: int) -> tuple[list[dict], dict]:
    """Row i's messages and the parts expected of it, written out by hand."""
    msgs = [{"role": "user", "content": f"question {i}"}]
    prompt = f"user: question {i}"
    if i % 2:  # multi-turn: the earlier assistant turn is part of the prompt
        msgs += [
            {"role": "assistant", "content": f"first answer {i}"},
            {"role": "user", "content": f"follow up {i}"},
        ]
        prompt += f"\n\nassistant: first answer {i}\n\nuser: follow up {i}"
    think = ""
    if i % 4 == 0:
        final = {"role": "assistant", "content": f"<think>inline thought {i}</think>answer {i}"}
        think = f"inline thought {i}"
    elif i % 4 == 1:
        final = {"role": "assistant", "content": f"answer {i}", "reasoning_content": f"why {i}"}
        think = f"why {i}"
    else:
        final = {"role": "assistant", "content": f"answer {i}"}
    msgs.append(final)
    parts = {
        "user_prompt": prompt,
        "think_text": think,
        "response_text": f"answer {i}",
        "num_turns": len(msgs),
    }
    return msgs, parts


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> tuple[Path, list[dict], list[dict]]:
    rows, expected = [], []
    for i in range(40):
        msgs, parts = _conversation(i)
        rows.append(
            {"id": f"c{i}", "source": SOURCES[(i * 7) % 4 if i < 36 else 3], "messages": msgs}
        )
        expected.append(parts)
    path = tmp_path_factory.mktemp("chat") / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=8)
    return path, rows, expected


@pytest.fixture(scope="module")
def sampled(chat_data, tmp_path_factory) -> Path:
    """A seeded random sample of 4 rows per source, embedded by 2 tasks."""
    path, _, _ = chat_data
    root = tmp_path_factory.mktemp("sampled")
    _ok(
        run_launch(
            *BASE,
            f"dataset.path={path}",
            "dataset.text_mode=chat",
            "dataset.per_source=4",
            "dataset.sampling=random",
            "dataset.seed=7",
            "embed.num_shards=2",
            f"run.root={root}",
            "run.name=pilot",
        )
    )
    return root / "pilot"


def test_sample_counts_row_index_and_conversation_parts(sampled, chat_data, st_model):
    _, rows, expected = chat_data
    run = sampled
    sample = pq.read_table(run / "embed" / "sample.parquet")
    meta = pq.read_table(run / "merge" / "metadata.parquet")
    index = meta.column("row_index").to_pylist()
    assert index == sample.column("row_index").to_pylist()  # nothing dropped, dataset order
    assert index == sorted(index) and len(index) == 16
    per_source = {s: [rows[i]["source"] for i in index].count(s) for s in SOURCES}
    assert per_source == dict.fromkeys(SOURCES, 4)
    plan = json.loads((run / "plan.json").read_text())
    assert plan["dataset_rows"] == 16
    assert plan["extra"]["sample"]["per_source"] == dict(sorted(per_source.items()))
    assert meta.column("id").to_pylist() == [rows[i]["id"] for i in index]
    assert meta.column("source").to_pylist() == [rows[i]["source"] for i in index]
    for k, i in enumerate(index):
        got = {c: meta.column(c)[k].as_py() for c in expected[i]}
        assert got == expected[i], f"dataset row {i}"
    # each vector is its own row's conversation, embedded as chat mode builds it
    texts = [
        "\n\n".join(p for p in (e["user_prompt"], e["think_text"], e["response_text"]) if p)
        for e in (expected[i] for i in index)
    ]
    emb = np.asarray(open_embeddings(run / "merge" / "embeddings.safetensors"))
    ref = st_model.encode(texts, convert_to_numpy=True)
    cos = np.sum(emb * ref, axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.9999


def test_random_sample_is_the_same_for_any_number_of_tasks(sampled, chat_data):
    from lib.config.compose import compose
    from lib.embed.inputs import embed_input

    path = chat_data[0]
    written = pq.read_table(sampled / "embed" / "sample.parquet")
    for shards in (1, 3, 16):
        cfg = compose(
            [
                f"dataset.path={path}",
                "dataset.text_mode=chat",
                "dataset.per_source=4",
                "dataset.sampling=random",
                "dataset.seed=7",
                f"embed.num_shards={shards}",
            ]
        )
        assert embed_input(cfg).sample.table().equals(written), shards
    # the merged rows are the sample's, whichever task embedded them
    meta = pq.read_table(sampled / "merge" / "metadata.parquet")
    assert meta.column("row_index").equals(written.column("row_index"))


def test_metrics_examples_show_the_conversation(sampled, caplog):
    from lib.metrics.levels import read_texts

    meta = sampled / "merge" / "metadata.parquet"
    table = pq.read_table(meta)
    with caplog.at_level(logging.WARNING):
        texts = read_texts(meta, "text", [0, 5])
    assert not [r for r in caplog.records if "has no column" in r.getMessage()]
    for r in (0, 5):
        assert table.column("user_prompt")[r].as_py() in texts[r]
        assert texts[r].endswith(table.column("response_text")[r].as_py())


# -- a dataset that grows ------------------------------------------------------------------

GROW = ["embed.device=cpu", "model.max_length=32", "stages=[embed,merge]"]


def _short_rows(corpus_table, n: int) -> pa.Table:
    """The first ``n`` corpus rows short enough to embed at 32 tokens (fast, none dropped)."""
    texts = corpus_table.column("text").to_pylist()
    keep = [i for i, t in enumerate(texts) if len(t) <= 80][:n]
    assert len(keep) == n
    return corpus_table.take(pa.array(keep))


def _fresh_run(root: Path, data: Path, ranges: list[tuple[int, int]]) -> Path:
    """A fresh run over ``data`` in this process, through the embed and merge tasks' own
    code, split into ``ranges`` (the grown run's split: embeddings are bitwise equal only
    for rows batched alike). In-process to spare the suite 5 model-loading processes."""
    from lib.config.compose import compose
    from lib.config.fields import to_params
    from lib.core.paths import RunPaths
    from lib.embed.shard import ShardTask, run_embed_shard
    from lib.merge.params import MergeParams
    from lib.merge.task import run_merge
    from lib.plan.registry import build_plan

    cfg = compose([*GROW, f"dataset.path={data}", f"run.root={root}", "run.name=fresh"])
    rows = ranges[-1][1]
    plan = build_plan(cfg, rows)
    paths = RunPaths(str(cfg.run.dir))
    embed = plan.stage("embed")
    for task in range(len(ranges)):
        shard = ShardTask(
            paths,
            "embed",
            embed.stage_dir,
            task,
            len(ranges),
            rows,
            embed.config_hash,
            ranges=tuple(ranges),
        )
        run_embed_shard(cfg, shard)
    embed = dataclasses.replace(embed, num_tasks=len(ranges))
    run_merge(to_params(cfg.merge, MergeParams), paths, plan.stage("merge"), embed, rows)
    return paths.root


@pytest.fixture(scope="module")
def grown(corpus_table, tmp_path_factory) -> dict:
    """1,000 rows embedded, then 500 appended; and a fresh run over the 1,500."""
    root = tmp_path_factory.mktemp("grow")
    data = root / "data.parquet"
    full = _short_rows(corpus_table, 1500)
    pq.write_table(full.slice(0, 1000), data)
    common = [*GROW, f"dataset.path={data}", f"run.root={root}", "embed.num_shards=1"]
    _ok(run_launch(*common, "run.name=grown"))
    run = root / "grown"
    old = [*(run / "embed" / "shards").iterdir(), *(run / "embed" / "completions").iterdir()]
    before = {p.relative_to(run): _sha(p) for p in old if p.is_file()}
    assert len(before) == 4  # the shard's embeddings, metadata and dropped rows; its marker
    pq.write_table(full, data)
    _ok(run_launch(*common, "embed.append=true", "run.name=grown"))
    fresh_data = root / "fresh.parquet"
    pq.write_table(full, fresh_data)
    fresh = _fresh_run(root, fresh_data, [(0, 1000), (1000, 1500)])
    return {
        "run": run,
        "fresh": Path(fresh),
        "before": before,
        "data": data,
        "common": common,
        "full": full,
    }


def test_append_embeds_only_new_rows_and_merges_like_a_fresh_run(grown):
    run, fresh = grown["run"], grown["fresh"]
    for name, sha in grown["before"].items():
        assert _sha(run / name) == sha, f"{name} changed"
    markers = sorted((run / "embed" / "completions").glob("task_*.json"))
    ranges = [json.loads(m.read_text())["row_range"] for m in markers]
    assert ranges == [[0, 1000], [1000, 1500]]
    assert _sha(run / "merge" / "embeddings.safetensors") == _sha(
        fresh / "merge" / "embeddings.safetensors"
    )
    meta = pq.read_table(run / "merge" / "metadata.parquet")
    assert meta.equals(pq.read_table(fresh / "merge" / "metadata.parquet"))
    dropped = pq.read_table(run / "merge" / "dropped_rows.parquet")
    assert meta.num_rows + dropped.num_rows == 1500
    assert meta.column("row_index").to_pylist()[-1] >= 1400  # the appended rows are in
    # keep_text in field mode: the text embedded, per row
    index = meta.column("row_index")
    assert meta.column("text").equals(grown["full"].column("text").take(index))


def test_append_refuses_a_shrunk_dataset(grown):
    # (another model or text setting refused: tests/unit/embed/test_append.py)
    run, data, common = grown["run"], grown["data"], grown["common"]
    merged = _sha(run / "merge" / "embeddings.safetensors")
    pq.write_table(grown["full"].slice(0, 900), data)
    try:
        proc = run_launch(*common, "embed.append=true", "run.name=grown")
    finally:
        pq.write_table(grown["full"], data)
    assert proc.returncode == 1
    assert "now has 900 rows to embed, fewer than the 1500 this run embedded" in proc.stderr
    assert _sha(run / "merge" / "embeddings.safetensors") == merged
    assert (run / "merge" / "completions" / "task_00000.json").exists()


# -- a hub dataset streamed by row group ---------------------------------------------------


def test_launch_embeds_a_streamed_hub_dataset_by_row_group(tmp_path):
    """testorg/tiny (4 parquet files, 33 rows) in an offline hub cache, streamed by 2
    tasks: the plan records each file's rows, no task reads and skips rows."""
    from tests.unit.data.hub_cache import SIZES, build_hub_cache

    cache = build_hub_cache(tmp_path / "hf")
    proc = run_launch(
        "dataset.path=testorg/tiny",
        "dataset.format=hf",
        "dataset.streaming=true",
        "embed.device=cpu",
        "embed.num_shards=2",
        "model.max_length=16",
        "stages=[embed]",
        f"run.root={tmp_path}",
        "run.name=hub",
        env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    _ok(proc)
    run = tmp_path / "hub"
    plan = json.loads((run / "plan.json").read_text())
    recorded = plan["extra"]["dataset_files"]["files"]
    assert [n for _, n in recorded] == SIZES
    assert all(str(cache) in f for f, _ in recorded)
    logs = "".join(p.read_text() for p in run.rglob("*.log"))
    assert "read by row group (not streamed)" in proc.stderr + logs
    assert "skips the" not in proc.stderr + logs
    markers = sorted((run / "embed" / "completions").glob("task_*.json"))
    assert [json.loads(m.read_text())["row_range"] for m in markers] == [[0, 17], [17, 33]]
    ids = pq.read_table(run / "embed" / "shards" / "shard_00001.parquet").column("id")
    assert ids.to_pylist() == [f"r{i}" for i in range(17, 33)]
