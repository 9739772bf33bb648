"""The index build: rows read by pread, streamed adds equal to one add, the published
files and marker, the id map, a killed build, and IVF recall against exact search."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.index_data import clustered_unit_vectors, queries_near, recall_at_k
from lib.core.errors import ConfigError, InvalidMarkerError
from lib.core.markers import read_marker
from lib.core.paths import INDEX_DIR, MERGE_DIR
from lib.formats.arrays import open_embeddings
from lib.formats.matrix_reader import MatrixReader
from lib.index.build import build_index, make_index, train_index
from lib.index.choice import choose_layout
from lib.index.params import IndexParams
from lib.index.search import load_index, search
from lib.index.task import write_index
from tests.unit.index.helpers import merged_run


def _matrix(tmp_path, x: np.ndarray) -> np.memmap:
    np.save(tmp_path / "m.npy", x)
    return open_embeddings(tmp_path / "m.npy")


def test_reader_chunks_and_take_equal_the_matrix(tmp_path):
    x = np.random.default_rng(0).standard_normal((103, 7)).astype(np.float16)
    reader = MatrixReader(_matrix(tmp_path, x))
    blocks = [(a, b.copy()) for a, b in reader.chunks(10)]
    assert [a for a, _ in blocks] == list(range(0, 103, 10))
    assert np.array_equal(np.concatenate([b for _, b in blocks]), x.astype(np.float32))
    assert blocks[0][1].dtype == np.float32
    rows = np.array([50, 3, 4, 5, 4, 102, 0, 3])  # unsorted, repeats, both ends
    assert np.array_equal(reader.take(rows), x[rows].astype(np.float32))
    with pytest.raises(IndexError, match=r"rows must be in 0..102"):
        reader.take(np.array([103]))


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq"])
def test_streamed_adds_equal_one_add_of_everything(tmp_path, kind):
    x = clustered_unit_vectors(2000, 32, seed=3)
    reader = MatrixReader(_matrix(tmp_path, x))
    params = IndexParams(kind=kind, nlist=16, pq_m=8, pq_nbits=4)
    layout = choose_layout(params, 2000, 32, "ip")
    streamed = build_index(layout, reader, seed=0, chunk_rows=77)
    whole = make_index(layout)
    train_index(whole, layout, reader, 0)
    whole.add(x)
    if layout.is_ivf:
        faiss.extract_index_ivf(whole).nprobe = layout.nprobe
    assert streamed.ntotal == 2000
    assert bytes(faiss.serialize_index(streamed)) == bytes(faiss.serialize_index(whole))


def test_the_stage_publishes_index_ids_and_settings_and_round_trips_the_rows(tmp_path):
    x = clustered_unit_vectors(600, 16, seed=1)
    paths = merged_run(tmp_path / "run", x, first_row=10, gap_every=4)
    leftover = paths.storage.path(f"{INDEX_DIR}/index.faiss.tmp-deadbeef")  # a killed build
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half an index")
    marker = write_index(
        paths, IndexParams(chunk_rows=50), embeddings=paths.merge_embeddings("npy"), config_hash="h"
    )
    assert not leftover.exists()
    names = {o.path for o in marker.outputs}
    assert names == {paths.index_file, paths.index_ids, paths.index_params}
    assert all(len(o.sha256) == 64 for o in marker.outputs)
    assert read_marker(paths.storage, paths.marker(INDEX_DIR, 0)).counts["rows"] == 600
    assert marker.extra["layout"]["kind"] == "flat" and marker.extra["layout"]["metric"] == "ip"
    assert marker.peak_rss_bytes > 0 and marker.cpu_seconds > 0
    ids = pq.read_table(paths.storage.path(paths.index_ids)).to_pydict()
    meta = pq.read_table(paths.storage.path(paths.merge_metadata)).to_pydict()
    assert ids["faiss_id"] == list(range(600))
    assert ids["row_index"] == meta["row_index"] and ids["id"] == meta["id"]
    assert ids["source"] == meta["source"]
    loaded = load_index(paths)
    hits = search(loaded, x[[0, 599]], 3)
    assert [h[0].faiss_id for h in hits] == [0, 599]  # a stored row finds itself first
    assert hits[1][0].row_index == meta["row_index"][599] and hits[1][0].id == meta["id"][599]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5)


def test_l2_for_rows_that_are_not_unit_vectors_and_ivf_settings_are_saved(tmp_path):
    x = 3.0 * clustered_unit_vectors(2000, 16, seed=2)
    paths = merged_run(tmp_path / "run", x)
    write_index(
        paths,
        IndexParams(kind="ivf_flat", nlist=20, nprobe=7),
        embeddings=paths.merge_embeddings("npy"),
        config_hash="h",
    )
    loaded = load_index(paths)
    assert loaded.settings["metric"] == "l2" and loaded.settings["nprobe"] == 7
    assert faiss.extract_index_ivf(loaded.index).nprobe == 7
    assert search(loaded, x[5], 1)[0][0].faiss_id == 5


def test_bad_settings_fail_before_anything_is_published(tmp_path):
    paths = merged_run(tmp_path / "run", clustered_unit_vectors(50, 8))
    with pytest.raises(ConfigError, match="index.nlist=80 is more than the 50 vectors"):
        write_index(
            paths,
            IndexParams(kind="ivf_flat", nlist=80),
            embeddings=paths.merge_embeddings("npy"),
            config_hash="h",
        )
    assert not paths.storage.exists(paths.index_file)
    assert not paths.storage.exists(paths.marker(INDEX_DIR, 0))


def test_a_changed_merged_matrix_is_refused_and_its_marker_invalidated(tmp_path):
    paths = merged_run(tmp_path / "run", clustered_unit_vectors(50, 8))
    f = paths.storage.path(paths.merge_embeddings("npy"))
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(InvalidMarkerError, match="sha256 .* differs"):
        write_index(paths, IndexParams(), embeddings=paths.merge_embeddings("npy"), config_hash="h")
    assert not paths.storage.exists(paths.marker(MERGE_DIR, 0))
    assert not paths.storage.exists(paths.index_file)


def test_ivf_recall_at_10_against_flat_at_the_default_nprobe(tmp_path):
    # 8,000 x 384 here (the suite's time budget on 2 cores); bench/bench_index.py measures
    # 200k and 1M x 384.
    x = clustered_unit_vectors(8000, 384, seed=0)
    queries = queries_near(x, 200)
    reader = MatrixReader(_matrix(tmp_path, x))
    flat = build_index(
        choose_layout(IndexParams(kind="flat"), 8000, 384, "ip"), reader, seed=0, chunk_rows=4096
    )
    ivf_layout = choose_layout(IndexParams(kind="ivf_flat"), 8000, 384, "ip")
    ivf = build_index(ivf_layout, reader, seed=0, chunk_rows=4096)
    _, exact = flat.search(queries, 10)
    _, approx = ivf.search(queries, 10)
    assert ivf_layout.nprobe == 22 and ivf_layout.nlist == 358
    assert recall_at_k(approx, exact) >= 0.95


def test_hnsw_is_built_in_chunks_into_reserved_storage(tmp_path):
    x = clustered_unit_vectors(500, 16, seed=4)
    reader = MatrixReader(_matrix(tmp_path, x))
    layout = choose_layout(IndexParams(kind="hnsw", hnsw_m=8, ef_search=32), 500, 16, "ip")
    index = build_index(layout, reader, seed=0, chunk_rows=64)
    assert index.ntotal == 500 and index.hnsw.efSearch == 32
    _, found = index.search(x[[0, 250, 499]], 1)
    assert found[:, 0].tolist() == [0, 250, 499]
