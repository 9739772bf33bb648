"""Merge on real shard files (the embed stage's format), including every refusal case."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file

from lib.core.errors import ShardValidationError
from lib.core.hashing import sha256_file
from lib.core.markers import CompletionMarker, write_marker
from lib.core.paths import RunPaths
from lib.core.storage import LocalStorage, OutputFile
from lib.formats.arrays import open_embeddings
from lib.formats.parquet import DROPPED_SCHEMA
from lib.merge.inputs import collect_embed_shards, collect_legacy_shards, validate_layout
from lib.merge.params import MergeFormat
from lib.merge.sources import legacy_dir_source
from lib.merge.stream import merge_shards
from lib.merge.tables import merge_metadata, split_by_source
from lib.plan.spec import ARRAY, StageSpec
from tests.pickle_canary import write_legacy_shards

HASH = "h" * 64


def shard_file(run_dir, task, key="embeddings"):
    return run_dir / getattr(RunPaths.embed_shard(task), key)


def make_shard(run_dir, task, start, stop, emb, sources=None):
    files = RunPaths.embed_shard(task)
    paths = {k: run_dir / getattr(files, k) for k in ("embeddings", "metadata", "dropped")}
    paths["embeddings"].parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": emb}, str(paths["embeddings"]))
    idx = np.arange(start, stop, dtype=np.int64)[: emb.shape[0]]
    pq.write_table(
        pa.table(
            {
                "row_index": idx,
                "id": [f"id{i}" for i in idx],
                "source": sources or ["s" + str(i % 3) for i in idx],
            }
        ),
        paths["metadata"],
    )
    pq.write_table(DROPPED_SCHEMA.empty_table(), paths["dropped"])
    outputs = [
        OutputFile(str(p.relative_to(run_dir)), p.stat().st_size, sha256_file(p))
        for p in paths.values()
    ]
    write_marker(
        LocalStorage(run_dir),
        RunPaths.marker("embed", task),
        CompletionMarker(
            "embed",
            task,
            0,
            HASH,
            row_range=[start, stop],
            counts={"embedded": emb.shape[0], "dim": emb.shape[1]},
            outputs=outputs,
        ),
    )


def spec(n):
    return StageSpec("embed", "embed", "jobs.embed", "embed", ARRAY, n, HASH)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def three_shards(tmp_path, rng):
    data = rng.normal(size=(30, 8)).astype(np.float32)
    for t, (a, b) in enumerate([(0, 10), (10, 20), (20, 30)]):
        make_shard(tmp_path, t, a, b, data[a:b])
    return data


@pytest.mark.parametrize("chunk", [1, 4, 65536])
def test_merge_streams_in_order(tmp_path, rng, chunk):
    data = three_shards(tmp_path, rng)
    inputs = collect_embed_shards(RunPaths(tmp_path), spec(3))
    validate_layout(inputs, 30)
    out = tmp_path / "merge"
    report, _ = merge_shards(
        inputs, LocalStorage(tmp_path), [MergeFormat.safetensors, MergeFormat.npy], chunk_rows=chunk
    )
    assert np.array_equal(np.asarray(open_embeddings(out / "embeddings.safetensors")), data)
    assert np.array_equal(np.load(out / "embeddings.npy"), data)
    assert report["shape"] == [30, 8]
    norms = np.linalg.norm(data, axis=1)
    assert report["l2_norm"]["min"] == pytest.approx(norms.min(), rel=1e-5)
    assert report["l2_norm"]["mean"] == pytest.approx(norms.mean(), rel=1e-5)
    assert [s["row_range"] for s in report["shards"]] == [[0, 10], [10, 20], [20, 30]]


def test_keep_first_and_expected_rows(tmp_path, rng):
    data = three_shards(tmp_path, rng)
    inputs = collect_embed_shards(RunPaths(tmp_path), spec(3))
    out = tmp_path / "merge"
    store = LocalStorage(tmp_path)
    report, _ = merge_shards(
        inputs, store, [MergeFormat.safetensors], keep_first=25, expected_rows=25
    )
    assert np.array_equal(np.asarray(open_embeddings(out / "embeddings.safetensors")), data[:25])
    assert report["shape"] == [25, 8]
    merge_metadata(inputs, store, "merge/metadata.parquet", 25)
    assert pq.read_table(out / "metadata.parquet").num_rows == 25
    with pytest.raises(ShardValidationError, match="expected_rows=29"):
        merge_shards(
            inputs, LocalStorage(tmp_path / "m2"), [MergeFormat.safetensors], expected_rows=29
        )
    assert not (tmp_path / "m2").exists() or not any(
        p.is_file() for p in (tmp_path / "m2").rglob("*")
    )


def test_missing_shard_is_named(tmp_path, rng):
    three_shards(tmp_path, rng)
    (tmp_path / "embed" / "completions" / "task_00001.json").unlink()
    with pytest.raises(ShardValidationError, match=r"tasks 1;"):
        collect_embed_shards(RunPaths(tmp_path), spec(3))


def test_truncated_shard_file(tmp_path, rng):
    three_shards(tmp_path, rng)
    p = shard_file(tmp_path, 2)
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(ShardValidationError, match=r"shard 2: .* \(truncated or modified\)"):
        collect_embed_shards(RunPaths(tmp_path), spec(3))


def test_gap_overlap_and_dimension(tmp_path, rng):
    make_shard(tmp_path, 0, 0, 10, rng.normal(size=(10, 8)).astype(np.float32))
    make_shard(tmp_path, 1, 8, 18, rng.normal(size=(10, 8)).astype(np.float32))  # overlap 8..10
    make_shard(tmp_path, 2, 20, 30, rng.normal(size=(10, 6)).astype(np.float32))  # gap, dim 6
    inputs = collect_embed_shards(RunPaths(tmp_path), spec(3))
    with pytest.raises(ShardValidationError) as err:
        validate_layout(inputs, 32)
    msg = str(err.value)
    assert (
        "overlap: shard_00001.safetensors (rows 8..18) and shard_00000.safetensors (rows 0..10) "
        "both cover rows 8..10" in msg
    )
    assert (
        "gap: rows 18..20 are in no shard: between shard_00001.safetensors (rows ..18) and "
        "shard_00002.safetensors (rows 20..)" in msg
    )
    assert "gap: rows 30..32" in msg
    assert "shard_00002.safetensors: dimension 6, the other shards have 8" in msg


def test_nan_rows_reported_by_original_index(tmp_path, rng):
    data = rng.normal(size=(30, 8)).astype(np.float32)
    data[13, 2] = np.nan
    data[27, 0] = np.inf
    for t, (a, b) in enumerate([(0, 10), (10, 20), (20, 30)]):
        make_shard(tmp_path, t, a, b, data[a:b])
    inputs = collect_embed_shards(RunPaths(tmp_path), spec(3))
    out = tmp_path / "merge"
    with pytest.raises(ShardValidationError) as err:
        merge_shards(inputs, LocalStorage(tmp_path), [MergeFormat.safetensors], chunk_rows=3)
    assert "rows 13" in str(err.value) and "rows 27" in str(err.value)
    assert not (out / "embeddings.safetensors").exists()
    assert not any(out.iterdir())  # no temporaries left either


def test_sha256_mismatch_is_refused(tmp_path, rng):
    three_shards(tmp_path, rng)
    p = shard_file(tmp_path, 1)
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF  # same size, different content
    p.write_bytes(bytes(raw))
    inputs = collect_embed_shards(RunPaths(tmp_path), spec(3))
    with pytest.raises(ShardValidationError, match="sha256 .* differs") as err:
        merge_shards(inputs, LocalStorage(tmp_path), [MergeFormat.safetensors])
    assert "marker invalidated; rerun the same command to redo task 1 of embed" in str(err.value)
    assert not (tmp_path / "merge" / "embeddings.safetensors").exists()
    # The marker is moved aside with the reason: the next run redoes task 1.
    assert not (tmp_path / RunPaths.marker("embed", 1)).exists()
    (aside,) = (tmp_path / "embed" / "completions" / "invalid").iterdir()
    assert aside.name.startswith("task_00001.")
    record = json.loads(aside.read_text())
    assert "sha256" in record["reason"] and record["content"]["task"] == 1


def test_a_truncated_shard_invalidates_its_marker(tmp_path, rng):
    three_shards(tmp_path, rng)
    p = shard_file(tmp_path, 2, "metadata")
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(ShardValidationError, match="truncated or modified") as err:
        collect_embed_shards(RunPaths(tmp_path), spec(3))
    assert "marker invalidated; rerun the same command to redo task 2 of embed" in str(err.value)
    assert not (tmp_path / RunPaths.marker("embed", 2)).exists()
    assert (tmp_path / RunPaths.marker("embed", 0)).exists()


def test_by_source_split(tmp_path, rng):
    data = three_shards(tmp_path, rng)
    inputs = collect_embed_shards(RunPaths(tmp_path), spec(3))
    out = tmp_path / "merge"
    paths = RunPaths(tmp_path)
    merge_shards(inputs, paths.storage, [MergeFormat.safetensors])
    merge_metadata(inputs, paths.storage, paths.merge_metadata, None)
    index, outputs = split_by_source(paths, paths.merge_embeddings(), paths.merge_metadata, 4)
    assert sum(v["rows"] for v in index.values()) == 30
    # Every file of the split is named for the merge marker.
    assert {o.path for o in outputs} == set(paths.storage.list(paths.merge_by_source))
    s1 = np.asarray(open_embeddings(out / "by_source" / "s1" / "embeddings.safetensors"))
    assert np.array_equal(s1, data[1::3])
    meta = pq.read_table(out / "by_source" / "s1" / "metadata.parquet")
    assert meta.column("row_index").to_pylist() == list(range(1, 30, 3))
    assert json.loads((out / "by_source" / "index.json").read_text())["s1"]["rows"] == 10


def test_legacy_pickles_refused_by_default(tmp_path, rng):
    canary = tmp_path / "UNPICKLED"
    write_legacy_shards(tmp_path, rng, canary)
    with pytest.raises(ShardValidationError, match="runs whatever code.*allow_pickle=true"):
        collect_legacy_shards([legacy_dir_source(str(tmp_path))], allow_pickle=False)
    assert not canary.exists()  # refused before any file was unpickled


def test_legacy_pickles_with_allow_pickle(tmp_path, rng, caplog):
    canary = tmp_path / "UNPICKLED"
    data = write_legacy_shards(tmp_path, rng, canary)
    inputs = collect_legacy_shards([legacy_dir_source(str(tmp_path))], allow_pickle=True)
    assert "unpickling runs code" in caplog.text
    assert canary.exists()  # the canary works: a load leaves it, so its absence means no load
    validate_layout(inputs, None)
    merge_shards(inputs, LocalStorage(tmp_path), [MergeFormat.npy])
    assert np.array_equal(np.load(tmp_path / "merge" / "embeddings.npy"), data)
