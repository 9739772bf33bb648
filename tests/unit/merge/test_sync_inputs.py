"""The merge of shards it did not compute: legacy pickles and embedfleet's own embed shards
synced from several hosts into ``sync/<source>/``, real files on disk, every refusal."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from safetensors.numpy import save_file

from cli.upstream import check_merge_inputs
from lib.core.errors import ShardValidationError, UpstreamIncompleteError
from lib.core.hashing import sha256_file
from lib.core.markers import CompletionMarker, write_marker
from lib.core.paths import RunPaths
from lib.core.storage import LocalStorage, OutputFile
from lib.formats.arrays import open_embeddings
from lib.formats.parquet import DROPPED_SCHEMA
from lib.merge.params import MergeFormat, MergeParams
from lib.merge.plan import build
from lib.merge.row_metadata import MetadataFile
from lib.merge.stream import merge_shards
from lib.merge.tables import check_metadata_rows, merge_metadata
from lib.merge.task import collect_inputs
from lib.plan.spec import ARRAY, SINGLE, StageSpec
from tests.merge_helpers import articles, two_host_legacy, write_articles, write_pickle

HASH = "a" * 64


@pytest.fixture
def data():
    return np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)


def legacy(**kw):
    return MergeParams(input="legacy", allow_pickle=True, **kw)


def test_legacy_from_two_synced_sources_equals_the_originals_merged(tmp_path, data):
    two_host_legacy(tmp_path, data)
    paths = RunPaths(tmp_path)
    inputs = collect_inputs(legacy(), paths, None, 0)
    assert [(s.source, s.label) for s in sorted(inputs, key=lambda s: s.row_start)] == [
        ("a", "cluster0_gpu0.pkl"),
        ("a", "cluster0_gpu1.pkl"),
        ("b", "cluster1_gpu0.pkl"),
        ("b", "cluster1_gpu1.pkl"),
    ]
    report, _ = merge_shards(inputs, paths.storage, [MergeFormat.npy], keep_first=30)
    assert np.array_equal(np.load(tmp_path / "merge" / "embeddings.npy"), data[:30])
    assert [s.get("source") for s in report["shards"]] == ["a", "a", "b", "b"]


def test_legacy_gap_between_two_sources_names_both_files(tmp_path, data):
    two_host_legacy(tmp_path, data, b_start=24)
    with pytest.raises(ShardValidationError) as err:
        collect_inputs(legacy(), RunPaths(tmp_path), None, 0)
    assert (
        "gap: rows 20..24 are in no shard: between cluster0_gpu1.pkl (source a, rows ..20) "
        "and cluster1_gpu0.pkl (source b, rows 24..)" in str(err.value)
    )


def test_legacy_overlap_between_two_sources_names_both_files(tmp_path, data):
    two_host_legacy(tmp_path, data)
    write_pickle(tmp_path / "sync" / "b" / "cluster1_gpu9.pkl", data[10:14], 10)
    with pytest.raises(ShardValidationError) as err:
        collect_inputs(legacy(), RunPaths(tmp_path), None, 0)
    assert (
        "overlap: cluster1_gpu9.pkl (source b, rows 10..14) and cluster0_gpu0.pkl "
        "(source a, rows 0..12) both cover rows 10..12" in str(err.value)
    )


def test_legacy_without_sources_says_where_it_looked(tmp_path):
    with pytest.raises(ShardValidationError, match=r"sync/<source>/.*merge.legacy_dir="):
        collect_inputs(legacy(), RunPaths(tmp_path), None, 0)


# -- merge.metadata_path ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "pkl"])
def test_metadata_joined_by_dataset_row(tmp_path, data, fmt):
    two_host_legacy(tmp_path, data)
    meta = write_articles(tmp_path / f"articles.{fmt}", articles(45), fmt)  # extra rows: fine
    paths = RunPaths(tmp_path)
    inputs = collect_inputs(legacy(), paths, None, 0)
    extra = MetadataFile(str(meta), allow_pickle=True)
    check_metadata_rows(extra, inputs, 30)
    merge_metadata(inputs, paths.storage, paths.merge_metadata, 30, extra, chunk_rows=5)
    table = pq.read_table(tmp_path / paths.merge_metadata)
    assert table.column("row_index").to_pylist() == list(range(30))
    assert table.column("id").to_pylist() == [f"w{i}" for i in range(30)]  # the file's ids
    assert table.column("title").to_pylist() == [f"t{i}" for i in range(30)]
    assert table.column("source").to_pylist() == ["legacy"] * 30


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_metadata_file_too_short_is_refused_naming_it_and_both_counts(tmp_path, data, fmt):
    two_host_legacy(tmp_path, data)
    meta = write_articles(tmp_path / f"articles.{fmt}", articles(33), fmt)
    inputs = collect_inputs(legacy(), RunPaths(tmp_path), None, 0)
    with pytest.raises(ShardValidationError) as err:
        check_metadata_rows(MetadataFile(str(meta), allow_pickle=False), inputs, None)
    msg = str(err.value)
    assert f"merge.metadata_path={meta} has 33 rows, but the merged matrix has 40 rows" in msg
    check_metadata_rows(MetadataFile(str(meta), allow_pickle=False), inputs, 33)  # keep_first


def test_pickled_metadata_needs_allow_pickle(tmp_path):
    meta = write_articles(tmp_path / "wikipedia.pkl", articles(3), "pkl")
    with pytest.raises(ShardValidationError, match="wikipedia.pkl is a pickle.*allow_pickle=true"):
        MetadataFile(str(meta), allow_pickle=False)


# -- merge.input=synced ------------------------------------------------------------------


def produce(embed_dir, task, num_tasks, start, stop, emb, config_hash=HASH, drop=()):
    """An embed stage dir as a host writes it: shard files, then the task's marker."""
    kept = [i for i in range(start, stop) if i not in drop]
    assert len(kept) == len(emb)
    base = embed_dir / "shards" / f"shard_{task:05d}"
    base.parent.mkdir(parents=True, exist_ok=True)
    files = {
        "safetensors": base.with_suffix(".safetensors"),
        "parquet": base.with_suffix(".parquet"),
        "dropped.parquet": base.with_suffix(".dropped.parquet"),
    }
    save_file({"embeddings": emb}, str(files["safetensors"]))
    idx = pa.array(kept, pa.int64())
    ids = pa.array([f"id{i}" for i in kept])
    pq.write_table(
        pa.table({"row_index": idx, "id": ids, "source": ["s"] * len(kept)}), files["parquet"]
    )
    dropped = [{"row_index": i, "id": f"id{i}", "source": "s", "reason": "empty"} for i in drop]
    table = pa.Table.from_pylist(dropped, DROPPED_SCHEMA) if drop else DROPPED_SCHEMA.empty_table()
    pq.write_table(table, files["dropped.parquet"])
    outputs = [
        OutputFile(f"embed/shards/{p.name}", p.stat().st_size, sha256_file(p))
        for p in files.values()
    ]
    marker = CompletionMarker(
        "embed",
        task,
        num_tasks,
        config_hash,
        row_range=[start, stop],
        counts={"embedded": len(emb), "dim": emb.shape[1]},
        outputs=outputs,
    )
    write_marker(
        LocalStorage(embed_dir.parent), f"{embed_dir.name}/completions/task_{task:05d}.json", marker
    )


def two_host_synced(run_dir, data):
    """Host a embedded tasks 0 and 1 (row 13 dropped); host b task 2. Host a's whole run
    dir was synced (``sync/a/embed/...``), host b's embed dir (``sync/b/shards/...``)."""
    produce(run_dir / "sync" / "a" / "embed", 0, 3, 0, 10, data[0:10])
    produce(
        run_dir / "sync" / "a" / "embed",
        1,
        3,
        10,
        20,
        data[[*range(10, 13), *range(14, 20)]],
        drop=(13,),
    )
    produce(run_dir / "sync" / "b", 2, 3, 20, 40, data[20:40])
    return np.concatenate([data[:13], data[14:]])


def synced():
    return MergeParams(input="synced")


def test_synced_shards_from_two_hosts_merge_with_metadata_by_dataset_row(tmp_path, data):
    expected = two_host_synced(tmp_path, data)
    paths = RunPaths(tmp_path)
    inputs = collect_inputs(synced(), paths, None, 0)
    assert sorted((s.task, s.source) for s in inputs) == [(0, "a"), (1, "a"), (2, "b")]
    merge_shards(inputs, paths.storage, [MergeFormat.safetensors], chunk_rows=4)
    merged = np.asarray(open_embeddings(tmp_path / "merge" / "embeddings.safetensors"))
    assert np.array_equal(merged, expected)
    meta = write_articles(tmp_path / "articles.parquet", articles(40), "parquet")
    merge_metadata(
        inputs, paths.storage, paths.merge_metadata, None, MetadataFile(str(meta), False), 4
    )
    table = pq.read_table(tmp_path / paths.merge_metadata)
    rows = [*range(13), *range(14, 40)]
    assert table.column("row_index").to_pylist() == rows
    assert table.column("title").to_pylist() == [f"t{i}" for i in rows]  # row 13 skipped


def test_tampered_synced_shard_is_refused_naming_file_and_marker(tmp_path, data):
    two_host_synced(tmp_path, data)
    shard = tmp_path / "sync" / "b" / "shards" / "shard_00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF  # same size, other content
    shard.write_bytes(bytes(raw))
    paths = RunPaths(tmp_path)
    inputs = collect_inputs(synced(), paths, None, 0)
    with pytest.raises(ShardValidationError) as err:
        merge_shards(inputs, paths.storage, [MergeFormat.safetensors])
    msg = str(err.value)
    assert f"{shard}: sha256" in msg and "differs" in msg
    assert f"its marker: {tmp_path}/sync/b/completions/task_00002.json" in msg
    assert "sync it again from source b" in msg
    assert (tmp_path / "sync" / "b" / "completions" / "task_00002.json").exists()  # a copy: kept
    assert not (tmp_path / "merge" / "embeddings.safetensors").exists()


def test_same_task_on_two_sources_with_other_content_is_refused(tmp_path, data):
    two_host_synced(tmp_path, data)
    produce(tmp_path / "sync" / "b", 0, 3, 0, 10, data[0:10] + 1)
    with pytest.raises(ShardValidationError) as err:
        collect_inputs(synced(), RunPaths(tmp_path), None, 0)
    msg = str(err.value)
    assert "task 0 is on source a" in msg and "and on source b" in msg
    assert "sync/a/embed/completions/task_00000.json" in msg
    assert "sync/b/completions/task_00000.json" in msg
    assert "shard_00000.safetensors: sha256" in msg


def test_same_task_on_two_sources_identical_is_merged_once(tmp_path, data):
    expected = two_host_synced(tmp_path, data)
    shutil.copytree(tmp_path / "sync" / "a" / "embed", tmp_path / "sync" / "c")
    inputs = collect_inputs(synced(), RunPaths(tmp_path), None, 0)
    assert sorted(s.task for s in inputs) == [0, 1, 2]
    assert sum(s.rows for s in inputs) == len(expected)


def test_synced_config_hash_disagreement_is_refused_naming_both(tmp_path, data):
    two_host_synced(tmp_path, data)
    shutil.rmtree(tmp_path / "sync" / "b")  # host b embedded under another config
    produce(tmp_path / "sync" / "b", 2, 3, 20, 40, data[20:40], config_hash="b" * 64)
    with pytest.raises(ShardValidationError) as err:
        collect_inputs(synced(), RunPaths(tmp_path), None, 0)
    msg = str(err.value)
    assert "different embed configurations" in msg
    first = f"source a ({tmp_path}/sync/a/embed/completions/task_00000.json) has config hash"
    assert f"{first} aaaaaaaaaaaa" in msg
    assert f"source b ({tmp_path}/sync/b/completions/task_00002.json) has bbbbbbbbbbbb" in msg


def test_synced_hash_must_be_the_planned_embed_hash(tmp_path, data):
    two_host_synced(tmp_path, data)
    embed = StageSpec("embed", "embed", "jobs.embed", "embed", ARRAY, 3, "c" * 64)
    with pytest.raises(ShardValidationError, match="this run's embed stage hashes to cccccccccccc"):
        collect_inputs(synced(), RunPaths(tmp_path), embed, 40)


def test_synced_missing_task_and_missing_markers(tmp_path, data):
    two_host_synced(tmp_path, data)
    shutil.rmtree(tmp_path / "sync" / "b")
    with pytest.raises(
        ShardValidationError, match=r"1 of 3 embed task\(s\) are on no source: tasks 2"
    ):
        collect_inputs(synced(), RunPaths(tmp_path), None, 0)
    shutil.rmtree(tmp_path / "sync" / "a" / "embed" / "completions")
    with pytest.raises(ShardValidationError, match="no embed completion marker"):
        collect_inputs(synced(), RunPaths(tmp_path), None, 0)


# -- the plan and the launch-time check --------------------------------------------------


def test_merge_after_sync_depends_on_it_and_hashes_it():
    cfg = OmegaConf.create({"merge": OmegaConf.structured(MergeParams(input="legacy"))})
    alone = build(cfg, 0, {})[0]
    sync = StageSpec("sync", "sync", "jobs.sync", "sync", ARRAY, 2, "s" * 64)
    after = build(cfg, 0, {"sync": sync})[0]
    other = build(cfg, 0, {"sync": StageSpec(**{**sync.__dict__, "config_hash": "t" * 64})})[0]
    assert alone.depends_on == () and after.depends_on == ("sync",)
    assert len({alone.config_hash, after.config_hash, other.config_hash}) == 3
    assert after.kind == SINGLE


def test_merge_only_launch_refuses_missing_synced_files(tmp_path, data):
    cfg = OmegaConf.create({"merge": OmegaConf.structured(MergeParams(input="synced"))})
    paths = RunPaths(tmp_path)
    with pytest.raises(
        UpstreamIncompleteError, match=rf"{tmp_path}/sync/<source>/.*stages=\[sync,merge\]"
    ):
        check_merge_inputs(cfg, paths, ["merge"])
    check_merge_inputs(cfg, paths, ["sync", "merge"])  # the sync downloads them first
    two_host_synced(tmp_path, data)
    check_merge_inputs(cfg, paths, ["merge"])
    cfg.merge.input, cfg.merge.legacy_dir = "legacy", str(tmp_path / "nothing")
    with pytest.raises(
        UpstreamIncompleteError, match=r"merge.legacy_dir=.*nothing, and there is none"
    ):
        check_merge_inputs(cfg, paths, ["merge"])
    cfg.merge.input, cfg.merge.metadata_path = "embed", str(tmp_path / "missing.parquet")
    with pytest.raises(ShardValidationError, match="missing.parquet does not exist"):
        check_merge_inputs(cfg, paths, ["embed", "merge"])
