"""Write a (rows, dim) matrix to .safetensors or .npy in chunks, never holding it whole.

The safetensors library only saves tensors that are in memory, so the writer emits the
format itself: an 8-byte little-endian header length, the JSON header (padded with
spaces to 8 bytes, as the library does) and the raw C-order data. The format follows the
suffix of ``name`` (``.npy`` or else safetensors); the bytes go to ``path``, normally the
local file of a ``Storage.publish`` block, which makes it visible when the block ends::

    with storage.publish("merge/embeddings.safetensors") as staged:
        w = MatrixWriter(staged.path, rows, dim, "float32", name="embeddings.safetensors")
        for block in blocks:
            w.write(block)
        staged.sha256 = w.close()

The writer hashes what it writes (sha256, on its own thread, in order), so the completion
marker gets the output's digest without reading the file again. A block passed to
``write`` must stay unchanged until the *next* ``write`` or ``close`` returns.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lib.formats.arrays import NUMPY_TO_ST


class MatrixWriter:
    def __init__(
        self,
        path: str | Path,
        rows: int,
        dim: int,
        dtype: str,
        *,
        name: str | None = None,
        key: str = "embeddings",
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.npy = (name or self.path.name).endswith(".npy")
        self.rows, self.dim, self.dtype = rows, dim, np.dtype(dtype)
        self.written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "wb")  # noqa: SIM115 (closed in close/abort)
        self._digest = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1)  # one thread: chunks are hashed in order
        self._pending: Future | None = None
        self.sha256: str | None = None
        header = self._header(key, metadata or {})
        self.fh.write(header)
        self._digest.update(header)

    def _header(self, key: str, metadata: dict[str, str]) -> bytes:
        nbytes = self.rows * self.dim * self.dtype.itemsize
        if self.npy:
            from numpy.lib import format as npformat

            buf = io.BytesIO()
            npformat.write_array_header_2_0(
                buf,
                {
                    "descr": npformat.dtype_to_descr(self.dtype),
                    "fortran_order": False,
                    "shape": (self.rows, self.dim),
                },
            )
            return buf.getvalue()
        header: dict = {
            key: {
                "dtype": NUMPY_TO_ST[str(self.dtype)],
                "shape": [self.rows, self.dim],
                "data_offsets": [0, nbytes],
            }
        }
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        return struct.pack("<Q", len(blob)) + blob

    def write(self, block: np.ndarray) -> None:
        if block.ndim != 2 or block.shape[1] != self.dim:
            raise ValueError(f"block of shape {block.shape} does not fit dim {self.dim}")
        if self.written + block.shape[0] > self.rows:
            raise ValueError(f"more than the declared {self.rows} rows written to {self.path}")
        if block.shape[0] == 0:
            return
        arr = np.ascontiguousarray(block, dtype=self.dtype)
        if np.may_share_memory(arr, block):
            # Hashed after this returns: a caller's buffer (a reader's reused block) may be
            # refilled by then, so the hash gets its own copy of what was written.
            arr = arr.copy()
        data = arr.data.cast("B")
        self.fh.write(data)
        self._wait()
        # hashlib releases the GIL: this block is hashed while the caller reads the next.
        self._pending = self._hasher.submit(self._digest.update, data)
        self.written += block.shape[0]

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> str:
        """Check the row count, flush and fsync; return the sha256 of what was written."""
        if self.written != self.rows:
            self.abort()
            raise ValueError(f"{self.path}: declared {self.rows} rows but {self.written} written")
        self._wait()
        self._hasher.shutdown()
        self.sha256 = self._digest.hexdigest()
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        return self.sha256

    def abort(self) -> None:
        """Stop writing and delete the partial file."""
        self._hasher.shutdown(wait=True, cancel_futures=True)
        if not self.fh.closed:
            self.fh.close()
        self.path.unlink(missing_ok=True)
