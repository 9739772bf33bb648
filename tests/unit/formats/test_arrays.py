"""Arrays with sidecars, safetensors memmaps and the streaming matrix writer."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from lib.formats.arrays import (
    ArrayFormatError,
    create_memmap,
    load_npy,
    open_embeddings,
    open_memmap,
    save_npy,
    sidecar_path,
)
from lib.formats.matrix_writer import MatrixWriter


def test_npy_sidecar_round_trip_and_mismatch(tmp_path):
    arr = np.arange(12, dtype=np.int64).reshape(3, 4)
    save_npy(tmp_path / "a.npy", arr)
    assert np.array_equal(load_npy(tmp_path / "a.npy", shape=(3, None)), arr)
    with pytest.raises(ArrayFormatError, match="expected shape"):
        load_npy(tmp_path / "a.npy", shape=(4, None))
    sidecar_path(tmp_path / "a.npy").write_text(json.dumps({"shape": [4, 3], "dtype": "int64"}))
    with pytest.raises(ArrayFormatError, match="sidecar says shape=\\[4, 3\\]"):
        load_npy(tmp_path / "a.npy")


def test_raw_memmap_refuses_wrong_size(tmp_path):
    m = create_memmap(tmp_path / "d.bin", (5, 2), "float32")
    m[:] = 1.0
    m.flush()
    assert open_memmap(tmp_path / "d.bin").shape == (5, 2)
    with open(tmp_path / "d.bin", "ab") as fh:
        fh.write(b"\0" * 4)
    with pytest.raises(ArrayFormatError, match="truncated or foreign"):
        open_memmap(tmp_path / "d.bin")


def test_truncated_safetensors_is_detected(tmp_path):
    p = tmp_path / "e.safetensors"
    save_file({"embeddings": np.ones((10, 4), np.float32)}, str(p))
    assert open_embeddings(p).shape == (10, 4)
    data = p.read_bytes()
    p.write_bytes(data[:-16])
    with pytest.raises(ArrayFormatError, match="truncated"):
        open_embeddings(p)


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_matrix_writer_streams_and_aborts(tmp_path, suffix):
    a = np.random.default_rng(0).normal(size=(9, 5)).astype(np.float32)
    w = MatrixWriter(tmp_path / f"m{suffix}", 9, 5, "float32")
    w.write(a[:4])
    w.write(a[4:])
    w.close()
    assert np.array_equal(np.asarray(open_embeddings(tmp_path / f"m{suffix}")), a)
    w = MatrixWriter(tmp_path / f"n{suffix}", 9, 5, "float32")
    w.write(a[:4])
    with pytest.raises(ValueError, match="declared 9 rows"):
        w.close()
    assert not (tmp_path / f"n{suffix}").exists()
    assert [p.name for p in tmp_path.iterdir()] == [f"m{suffix}"]


def test_the_matrix_writer_hashes_a_reused_buffer_as_it_was_written(tmp_path):
    # The merge reads shards into reused buffers; the writer hashes each block on its own
    # thread after write() returns. A buffer refilled at once (the next shard's first
    # block) must not change the sha256 the marker records (it did, under load).
    import hashlib

    rows, dim = 1 << 15, 256  # 32 MiB blocks: hashing one takes tens of milliseconds
    buf = np.empty((rows, dim), dtype=np.float32)
    w = MatrixWriter(tmp_path / "m.safetensors", 2 * rows, dim, "float32")
    buf[:] = 1.0
    w.write(buf)
    buf[:] = 2.0
    w.write(buf)
    buf[:] = 3.0
    sha = w.close()
    assert sha == hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest()
