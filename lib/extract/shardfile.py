"""The activation shard format: a safetensors file, optionally zstd-compressed.

``shard_XXXXX.safetensors`` is a plain safetensors file (``safetensors.safe_open`` reads
it). ``shard_XXXXX.safetensors.zst`` is the same bytes as a sequence of zstd frames: one
for the 8-byte length and JSON header, then one per tensor, in header order. Any zstd
decoder (``zstd -d``) restores the safetensors file; the per-tensor frames let a reader
fetch one layer of a remote shard by a range read (the frame offsets are in the task's
``metadata.json``).

With ``byte_shuffle`` the bytes of each activation tensor are stored plane by plane (all
first bytes of its values, then all second bytes, ...) chunk by chunk as they were
written; the header's ``__metadata__["shuffle_chunks"]`` lists the chunks' token counts
(``unshuffle`` undoes it). Ids and counts are never shuffled.

Bytes are counted as they are written: a shard is closed as soon as the compressed bytes
it holds reach the cap (``ShardBuilder.bytes``), so a shard exceeds the cap by at most one
batch.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

# safetensors dtype names of the numpy arrays we store (bf16 travels as uint16 bits).
ST_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32", "int64": "I64", "int32": "I32"}
NP_DTYPES = {
    "BF16": np.uint16,
    "F16": np.float16,
    "F32": np.float32,
    "I64": np.int64,
    "I32": np.int32,
}
SHUFFLE_KEY = "shuffle_chunks"


def layer_tensor(layer: int) -> str:
    return f"layer_{layer}"


@dataclass
class Frame:
    """Where one part of a compressed shard lies: [offset, offset + bytes) of the file."""

    offset: int
    bytes: int
    sha256: str

    def to_json(self) -> list[Any]:
        return [self.offset, self.bytes, self.sha256]


@dataclass
class _Tensor:
    st_dtype: str
    row_shape: tuple[int, ...]
    shuffled: bool
    rows: int = 0
    raw_bytes: int = 0
    parts: list[bytes] = field(default_factory=list)
    compressor: Any = None


def shuffle_bytes(data: np.ndarray) -> bytes:
    """``data``'s bytes plane by plane (byte 0 of every value, then byte 1, ...)."""
    width = data.dtype.itemsize
    return np.ascontiguousarray(data.view(np.uint8).reshape(-1, width).T).tobytes()


def unshuffle(raw: bytes | memoryview, width: int, chunk_values: list[int]) -> bytes:
    """Undo ``shuffle_bytes`` chunk by chunk (``chunk_values``: values per chunk)."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    out = np.empty_like(buf)
    pos = 0
    for n in chunk_values:
        size = n * width
        out[pos : pos + size] = buf[pos : pos + size].reshape(width, n).T.reshape(-1)
        pos += size
    return out.tobytes()


class ShardBuilder:
    """One shard being filled: ``add`` whole batches, ``bytes`` is what the file would
    hold now (compressed), ``write`` writes it. ``tensors``: name -> (dtype, row shape,
    shuffled), in file order."""

    def __init__(
        self,
        tensors: dict[str, tuple[str, tuple[int, ...], bool]],
        *,
        compression: str,
        level: int,
        metadata: dict[str, str],
    ) -> None:
        self.compression = compression
        self.level = level
        self.metadata = dict(metadata)
        self._tensors = {
            name: _Tensor(ST_DTYPES.get(dt, dt), tuple(shape), shuffled and compression == "zstd")
            for name, (dt, shape, shuffled) in tensors.items()
        }
        self.chunks: list[int] = []  # rows per add() of the shuffled tensors
        self.samples = 0
        self.tokens = 0
        self._bytes = 0
        if compression == "zstd":
            import zstandard

            self._zstd = zstandard
            for t in self._tensors.values():
                t.compressor = zstandard.ZstdCompressor(level=level).compressobj()

    @property
    def bytes(self) -> int:
        """Tensor bytes the file holds so far, after compression (the header not counted)."""
        return self._bytes

    def add(self, arrays: dict[str, np.ndarray], samples: int, tokens: int) -> None:
        """Append one batch: every tensor of the shard, rows in sample order."""
        if set(arrays) != set(self._tensors):
            raise ValueError(
                f"a batch has tensors {sorted(arrays)}, the shard {sorted(self._tensors)}"
            )
        rows = None
        for name, t in self._tensors.items():
            a = np.ascontiguousarray(arrays[name])
            if a.dtype != NP_DTYPES[t.st_dtype] or tuple(a.shape[1:]) != t.row_shape:
                raise ValueError(
                    f"tensor {name}: got {a.dtype} {a.shape}, the shard holds "
                    f"{t.st_dtype} (n, {', '.join(map(str, t.row_shape))})"
                )
            t.rows += a.shape[0]
            t.raw_bytes += a.nbytes
            if t.shuffled:
                rows = a.shape[0] if rows is None else rows
                data = shuffle_bytes(a)
            else:
                data = a.tobytes()
            if t.compressor is not None:
                # One flushed block per batch: the bytes counted are the bytes written.
                out = t.compressor.compress(data) + t.compressor.flush(
                    self._zstd.COMPRESSOBJ_FLUSH_BLOCK
                )
            else:
                out = data
            t.parts.append(out)
            self._bytes += len(out)
        if rows is not None:
            self.chunks.append(rows)
        self.samples += samples
        self.tokens += tokens

    def _header(self) -> bytes:
        header: dict[str, Any] = {}
        offset = 0
        for name, t in self._tensors.items():
            header[name] = {
                "dtype": t.st_dtype,
                "shape": [t.rows, *t.row_shape],
                "data_offsets": [offset, offset + t.raw_bytes],
            }
            offset += t.raw_bytes
        meta = dict(self.metadata)
        if any(t.shuffled for t in self._tensors.values()):
            meta[SHUFFLE_KEY] = json.dumps(self.chunks)
        header["__metadata__"] = meta
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
        return struct.pack("<Q", len(text)) + text

    def write(self, fh: BinaryIO) -> tuple[str, int, dict[str, Frame]]:
        """Write the file to ``fh``; return its sha256, size and the frames (the header's
        as ``__header__``; empty without compression)."""
        digest = hashlib.sha256()
        frames: dict[str, Frame] = {}
        pos = 0

        def emit(name: str, parts: list[bytes]) -> None:
            nonlocal pos
            part_digest = hashlib.sha256()
            size = 0
            for p in parts:
                fh.write(p)
                digest.update(p)
                part_digest.update(p)
                size += len(p)
            frames[name] = Frame(pos, size, part_digest.hexdigest())
            pos += size

        header = self._header()
        if self.compression == "zstd":
            header = self._zstd.ZstdCompressor(level=self.level).compress(header)
        emit("__header__", [header])
        for name, t in self._tensors.items():
            parts = t.parts
            if t.compressor is not None:
                parts = [*parts, t.compressor.flush()]
            emit(name, parts)
            t.parts = []
        return digest.hexdigest(), pos, frames


def parse_header(raw: bytes) -> tuple[dict[str, Any], int]:
    """The safetensors header of a (decompressed) shard's first bytes and where its data
    starts. Raises ``ValueError`` on bytes that are not a safetensors header."""
    if len(raw) < 8:
        raise ValueError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > 100_000_000 or len(raw) < 8 + n:
        raise ValueError(f"bad safetensors header length {n}")
    return json.loads(raw[8 : 8 + n]), 8 + n


def tensor_array(
    header: dict[str, Any], name: str, data: bytes | memoryview, chunk_values: list[int] | None
) -> np.ndarray:
    """The numpy array of tensor ``name`` from its raw data (unshuffled when shuffled)."""
    info = header[name]
    dtype = np.dtype(NP_DTYPES[info["dtype"]])
    if chunk_values is not None:
        data = unshuffle(data, dtype.itemsize, chunk_values)
    return np.frombuffer(data, dtype=dtype).reshape(info["shape"])
