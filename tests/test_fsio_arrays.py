import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from lib.arrays import (
    ArrayFormatError,
    create_memmap,
    load_npy,
    open_embeddings,
    open_memmap,
    save_npy,
    sidecar_path,
)
from lib.fsio import atomic_path, atomic_write_json, check_writable, remove_stale_temporaries
from lib.markers import (
    CompletionMarker,
    ConfigMismatchError,
    check_marker,
    describe_outputs,
    write_marker,
)
from lib.stream_writers import MatrixWriter


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_and_stale_cleanup(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    (tmp_path / "b.json.tmp-abc").write_text("junk")
    assert remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


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


def test_marker_validity(tmp_path):
    out = tmp_path / "s" / "x.bin"
    out.parent.mkdir()
    out.write_bytes(b"12345")
    m = CompletionMarker("s", 0, 1, "h1", outputs=describe_outputs(tmp_path, [out]))
    write_marker(tmp_path, "s", m)
    assert check_marker(tmp_path, "s", 0, "h1") is not None
    with pytest.raises(ConfigMismatchError, match="different configuration"):
        check_marker(tmp_path, "s", 0, "h2")
    out.write_bytes(b"123")  # truncated output: the marker no longer counts
    assert check_marker(tmp_path, "s", 0, "h1") is None


def test_check_writable_names_the_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="not writable.*run.root"):
        check_writable(blocker / "sub")
