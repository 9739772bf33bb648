"""Arrays on disk with a JSON sidecar that states their shape and dtype.

Every array a stage writes for another stage to read (centroids, assignments, cluster
members, distance scratch files) has ``<file>.json`` beside it: ``{"shape": [...],
"dtype": "float32"}``. Opening checks the file against its sidecar, so a file of the
wrong size or a header that disagrees is an error, never a silent reinterpretation.

Formats:
- ``.npy``: self-describing; memory-mapped read-only with ``allow_pickle=False``.
- raw (``.bin`` or anything else): a flat C-order buffer, described by the sidecar only;
  used for writable scratch memmaps.
- ``.safetensors``: read as a memmap at the data offset named by its header.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from lib.core.errors import EmbedfleetError
from lib.core.paths import sidecar
from lib.core.storage import LocalStorage, OutputFile, Storage, atomic_write_json


class ArrayFormatError(EmbedfleetError, ValueError):
    """An array file disagrees with its sidecar or header, or is truncated."""


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype of an array on disk."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}


def sidecar_path(path: str | Path) -> Path:
    """The sidecar of ``path``: the same name with ``.json`` appended."""
    p = Path(path)
    return p.with_name(sidecar(p.name))


def write_sidecar(path: str | Path, spec: ArraySpec) -> None:
    atomic_write_json(sidecar_path(path), spec.to_json())


def read_sidecar(path: str | Path) -> ArraySpec:
    """Read and check the sidecar of ``path``."""
    side = sidecar_path(path)
    if not side.exists():
        raise ArrayFormatError(f"{path}: sidecar {side} is missing; the array cannot be trusted")
    try:
        meta = json.loads(side.read_text())
        spec = ArraySpec(tuple(int(d) for d in meta["shape"]), str(np.dtype(meta["dtype"])))
    except (ValueError, KeyError, TypeError) as exc:
        raise ArrayFormatError(f"{side}: not a valid sidecar ({exc})") from exc
    return spec


def _check(path: Path, actual: ArraySpec, expected: ArraySpec, what: str) -> None:
    if actual != expected:
        raise ArrayFormatError(
            f"{path}: {what} says shape={list(actual.shape)} dtype={actual.dtype}, but the "
            f"sidecar says shape={list(expected.shape)} dtype={expected.dtype}; "
            "the file was written by something else or is corrupt: regenerate it"
        )


def publish_npy(storage: Storage, name: str, array: np.ndarray) -> list[OutputFile]:
    """Publish ``array`` as ``name`` (.npy), then its sidecar; return both as outputs."""
    arr = np.ascontiguousarray(array)
    spec = ArraySpec(tuple(arr.shape), str(arr.dtype))
    with storage.publish(name) as staged, open(staged.path, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
    assert staged.output is not None
    return [staged.output, storage.publish_json(sidecar(name), spec.to_json())]


def read_npy(
    storage: Storage,
    name: str,
    *,
    shape: tuple[int | None, ...] | None = None,
    dtype: str | None = None,
) -> np.ndarray:
    """The published .npy ``name`` checked against its sidecar, memory-mapped from a local
    file (a cached copy, with the sidecar beside it, on an object store)."""
    try:
        storage.local_path(sidecar(name))
        local = storage.local_path(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"array file {storage.url(name)} does not exist") from None
    return load_npy(local, shape=shape, dtype=dtype)


def save_npy(path: str | Path, array: np.ndarray) -> ArraySpec:
    """Write ``array`` to the local ``path`` (.npy) atomically, then its sidecar."""
    p = Path(path)
    publish_npy(LocalStorage(p.parent), p.name, array)
    return ArraySpec(tuple(np.shape(array)), str(np.asarray(array).dtype))


def load_npy(
    path: str | Path,
    *,
    mmap: bool = True,
    shape: tuple[int | None, ...] | None = None,
    dtype: str | None = None,
) -> np.ndarray:
    """Open a .npy array checked against its sidecar (and optional expectations).

    ``shape`` may contain ``None`` for dimensions that are not checked.
    Raises ``ArrayFormatError`` on any disagreement, ``FileNotFoundError`` if missing.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"array file {p} does not exist")
    spec = read_sidecar(p)
    try:
        arr = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        raise ArrayFormatError(f"{p}: cannot be read as .npy ({exc}); regenerate it") from exc
    _check(p, ArraySpec(tuple(arr.shape), str(arr.dtype)), spec, ".npy header")
    _check_expected(p, spec, shape, dtype)
    return arr


def _check_expected(
    path: Path, spec: ArraySpec, shape: tuple[int | None, ...] | None, dtype: str | None
) -> None:
    if shape is not None:
        ok = len(shape) == len(spec.shape) and all(
            e is None or e == a for e, a in zip(shape, spec.shape, strict=False)
        )
        if not ok:
            want = ["*" if d is None else d for d in shape]
            raise ArrayFormatError(f"{path}: expected shape {want}, found {list(spec.shape)}")
    if dtype is not None and np.dtype(dtype) != np.dtype(spec.dtype):
        raise ArrayFormatError(f"{path}: expected dtype {dtype}, found {spec.dtype}")


def create_memmap(path: str | Path, shape: tuple[int, ...], dtype: str) -> np.memmap:
    """Create a writable raw memmap of ``shape``/``dtype`` with its sidecar.

    The sidecar is written first so that a file without one is known to be foreign.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    spec = ArraySpec(tuple(int(d) for d in shape), str(np.dtype(dtype)))
    write_sidecar(p, spec)
    with open(p, "wb") as fh:
        fh.truncate(spec.nbytes)
    return np.memmap(p, dtype=spec.dtype, mode="r+", shape=spec.shape)


def open_memmap(
    path: str | Path,
    mode: str = "r",
    *,
    shape: tuple[int | None, ...] | None = None,
    dtype: str | None = None,
) -> np.memmap:
    """Open a raw memmap checked against its sidecar: size, shape and dtype must agree."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"array file {p} does not exist")
    spec = read_sidecar(p)
    size = p.stat().st_size
    if size != spec.nbytes:
        raise ArrayFormatError(
            f"{p}: file has {size} bytes but the sidecar's shape={list(spec.shape)} "
            f"dtype={spec.dtype} needs {spec.nbytes}; it is truncated or foreign"
        )
    _check_expected(p, spec, shape, dtype)
    return np.memmap(p, dtype=spec.dtype, mode=mode, shape=spec.shape)


_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
}
ST_TO_NUMPY = dict(_ST_DTYPES)
NUMPY_TO_ST = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors_header(fh: BinaryIO, size: int, where: str) -> tuple[dict, int]:
    """(header dict, byte offset of the data section) of the safetensors stream ``fh``
    (positioned at its start) of ``size`` bytes; ``where`` names it in errors."""
    raw = fh.read(8)
    if len(raw) != 8:
        raise ArrayFormatError(f"{where}: too short to be a safetensors file ({size} bytes)")
    (hlen,) = struct.unpack("<Q", raw)
    if hlen > size - 8 or hlen > 100 << 20:
        raise ArrayFormatError(f"{where}: corrupt safetensors header length {hlen}")
    try:
        header = json.loads(fh.read(hlen))
    except ValueError as exc:
        raise ArrayFormatError(f"{where}: corrupt safetensors header ({exc})") from exc
    return header, 8 + hlen


def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """Return (header dict, byte offset of the data section) of a safetensors file."""
    p = Path(path)
    with open(p, "rb") as fh:
        return read_safetensors_header(fh, p.stat().st_size, str(p))


def open_safetensors_memmap(path: str | Path, key: str = "embeddings") -> np.memmap:
    """Memory-map tensor ``key`` of a safetensors file read-only, checking its extent."""
    p = Path(path)
    header, offset = safetensors_header(p)
    if key not in header:
        keys = sorted(k for k in header if k != "__metadata__")
        raise ArrayFormatError(f"{p}: no tensor named {key!r} (found {keys})")
    info = header[key]
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None or dtype == "bfloat16":
        raise ArrayFormatError(f"{p}: tensor {key!r} has dtype {info['dtype']}, not memmappable")
    start, end = info["data_offsets"]
    spec = ArraySpec(tuple(info["shape"]), dtype)
    if end - start != spec.nbytes or offset + end > p.stat().st_size:
        raise ArrayFormatError(
            f"{p}: tensor {key!r} needs bytes {offset + start}..{offset + end} but the file has "
            f"{p.stat().st_size}; the file is truncated: rerun the task that wrote it"
        )
    return np.memmap(p, dtype=dtype, mode="r", offset=offset + start, shape=spec.shape)


def open_embeddings(path: str | Path) -> np.ndarray:
    """Open a matrix of embeddings read-only without loading it: .npy, .safetensors or raw."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"embeddings file {p} does not exist; run the merge stage first or point to the file"
        )
    if p.suffix == ".safetensors":
        arr = open_safetensors_memmap(p)
    elif p.suffix == ".npy":
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
        if sidecar_path(p).exists():
            _check(p, ArraySpec(tuple(arr.shape), str(arr.dtype)), read_sidecar(p), ".npy header")
    else:
        arr = open_memmap(p)
    if arr.ndim != 2:
        raise ArrayFormatError(f"{p}: embeddings must be 2-D (rows, dim), found shape {arr.shape}")
    return arr
