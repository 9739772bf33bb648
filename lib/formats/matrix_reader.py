"""Rows of a merged matrix read with ``pread`` from its file, not through the memory map
(the index build, search by row, the report's streamed PCA).

Touched pages of a memory map count in a process's resident set until it unmaps them, so
adding a 1.5 GB matrix chunk by chunk through ``np.memmap`` ends with the whole file in
RSS beside the index. Reading each chunk into one reused buffer keeps the build at the
index plus one chunk (the file stays in the page cache, which is not the task's memory).
The memory map is still how the file is opened and checked (``open_embeddings``: extent,
shape, dtype); this reads the bytes it describes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np


class MatrixReader:
    """Rows of the 2-D ``np.memmap`` ``matrix`` (C order), as float32, by ``pread``."""

    def __init__(self, matrix: np.memmap) -> None:
        if matrix.ndim != 2 or not matrix.flags.c_contiguous:
            raise ValueError(f"expected a C-ordered 2-D memmap, got shape {matrix.shape}")
        self.path = Path(str(matrix.filename))
        self.offset = int(matrix.offset)
        self.rows, self.dim = (int(s) for s in matrix.shape)
        self.dtype = np.dtype(matrix.dtype)
        self.row_bytes = self.dim * self.dtype.itemsize

    def _read_into(self, fd: int, start: int, out: np.ndarray) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        pos, done = self.offset + start * self.row_bytes, 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n <= 0:
                raise OSError(f"{self.path}: unexpected end of file at byte {pos + done}")
            done += n

    def _as_float32(self, raw: np.ndarray) -> np.ndarray:
        return raw if self.dtype == np.float32 else raw.astype(np.float32)

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, rows)`` blocks of up to ``chunk_rows`` rows, in order. The block
        is a reused buffer: consume it before asking for the next one."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        buffer = np.empty((min(chunk_rows, max(self.rows, 1)), self.dim), dtype=self.dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for start in range(0, self.rows, chunk_rows):
                n = min(chunk_rows, self.rows - start)
                block = buffer[:n]
                self._read_into(fd, start, block)
                yield start, self._as_float32(block)
        finally:
            os.close(fd)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (any order, in that order) as a new float32 array; runs of
        consecutive rows are read with one call."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"{self.path}: rows must be in 0..{self.rows - 1}")
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        raw = np.empty((len(rows), self.dim), dtype=self.dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            i = 0
            while i < len(ordered):
                j = i + 1
                while j < len(ordered) and ordered[j] <= ordered[j - 1] + 1:
                    j += 1
                first, last = int(ordered[i]), int(ordered[j - 1])
                if last - first + 1 == j - i:  # a run of distinct consecutive rows
                    self._read_into(fd, first, raw[i:j])
                else:  # repeats inside the run: read its rows once, then place them
                    block = np.empty((last - first + 1, self.dim), dtype=self.dtype)
                    self._read_into(fd, first, block)
                    raw[i:j] = block[ordered[i:j] - first]
                i = j
        finally:
            os.close(fd)
        out = np.empty_like(raw)
        out[order] = raw
        return self._as_float32(out)
