"""The rows one k-means problem runs on, as one rank sees them.

- ``PointSet``: the points of a problem: rows of a 2-D array (normally a read-only memmap
  of the embeddings or of a previous level's centroids), optionally a subset named by
  sorted row indices (a resampling step's sample, one pre-cluster in split mode).
- ``Shard``: this rank's contiguous block of points, ``contiguous_range(n, rank, world)``,
  handed out on a torch device in chunks of ``chunk_rows`` rows. On CPU, when the stored
  dtype is the compute dtype, chunks are zero-copy views of the memmap (the page cache
  holds the data, nothing is copied); on CUDA the shard is copied to the device once when
  it fits the cache budget; otherwise every pass converts chunk by chunk. No rank ever
  loads more than its own shard, and none loads the whole matrix.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lib.compute.comm import Comm
from lib.compute.tensors import as_tensor, torch_dtype
from lib.core.sharding import contiguous_range
from lib.kmeans.assign import row_sq_norms

DEFAULT_CHUNK_ROWS = 65536
# A CPU shard that needs a dtype conversion is kept converted in memory up to this size.
CPU_CACHE_BYTES = 2 << 30
# On CUDA the shard is kept on the device when it takes at most this share of free memory.
CUDA_CACHE_SHARE = 0.5


class PointSet:
    """The points of one k-means problem: ``data[p]``, or ``data[indices[p]]`` for a subset.

    ``data`` is any 2-D array (typically a read-only memmap); ``indices``, when given, must
    be sorted row numbers of ``data`` (sorted keeps memmap reads sequential).
    """

    def __init__(self, data: np.ndarray, indices: np.ndarray | None = None) -> None:
        if data.ndim != 2:
            raise ValueError(f"points must be a 2-D array, got shape {data.shape}")
        self.data = data
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.n = int(data.shape[0] if self.indices is None else len(self.indices))
        self.dim = int(data.shape[1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Points ``start..stop`` in the stored dtype."""
        if self.indices is None:
            return self.data[start:stop]
        return self.data[self.indices[start:stop]]

    def take(self, points: np.ndarray) -> np.ndarray:
        """Points at the given positions (any order) in the stored dtype."""
        points = np.asarray(points, dtype=np.int64)
        rows = points if self.indices is None else self.indices[points]
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), self.dim), dtype=self.data.dtype)
        out[order] = self.data[rows[order]]
        return out


class Shard:
    """This rank's contiguous block of a ``PointSet`` on ``device``, in compute ``dtype``.

    Local row ``i`` is point ``start + i`` of the set. ``chunks()`` yields
    ``(local_offset, tensor)`` pairs; ``gather(idx)`` returns arbitrary local rows.
    """

    def __init__(
        self,
        points: PointSet,
        comm: Comm,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        cache_bytes: int | None = None,
    ) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.points = points
        self.comm = comm
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        self.chunk_rows = int(chunk_rows)
        self.start, self.stop = contiguous_range(points.n, comm.rank, comm.world)
        self.n = self.stop - self.start
        self.dim = points.dim
        self._norms: torch.Tensor | None = None
        self._resident = self._make_resident(cache_bytes)

    # -- set-up ----------------------------------------------------------------------
    def _make_resident(self, cache_bytes: int | None) -> torch.Tensor | None:
        same_dtype = str(self.points.data.dtype) == str(self.dtype).removeprefix("torch.")
        if self.device.type == "cpu" and self.points.indices is None and same_dtype:
            return as_tensor(self.points.data[self.start : self.stop])
        need = self.n * self.dim * torch.empty((), dtype=self.dtype).element_size()
        if cache_bytes is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                cache_bytes = int(free * CUDA_CACHE_SHARE)
            else:
                cache_bytes = CPU_CACHE_BYTES
        if need > cache_bytes:
            return None
        out = torch.empty((self.n, self.dim), dtype=self.dtype, device=self.device)
        for a in range(0, self.n, self.chunk_rows):
            b = min(a + self.chunk_rows, self.n)
            out[a:b] = self._convert(self.points.read(self.start + a, self.start + b))
        return out

    def _convert(self, rows: np.ndarray) -> torch.Tensor:
        return as_tensor(rows).to(device=self.device, dtype=self.dtype, non_blocking=True)

    # -- access ----------------------------------------------------------------------
    @property
    def resident(self) -> bool:
        """Whether chunks are views of one tensor (no conversion on each pass)."""
        return self._resident is not None

    def read(self, a: int, b: int) -> torch.Tensor:
        """Local rows ``a..b`` in compute dtype on the device."""
        if self._resident is not None:
            return self._resident[a:b]
        return self._convert(self.points.read(self.start + a, self.start + b))

    def chunks(self, chunk_rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        step = chunk_rows or self.chunk_rows
        for a in range(0, self.n, step):
            yield a, self.read(a, min(a + step, self.n))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Local rows at ``local`` (int64, ascending keeps memmap reads sequential)."""
        if self._resident is not None:
            return self._resident.index_select(0, local.to(self._resident.device))
        idx = local.cpu().numpy() + self.start
        return self._convert(self.points.take(idx))

    def norms(self) -> torch.Tensor:
        """Squared L2 norm of every local row (computed once in the compute dtype, held as
        float64 on the device)."""
        if self._norms is None:
            out = torch.empty(self.n, dtype=torch.float64, device=self.device)
            for a, x in self.chunks():
                out[a : a + len(x)] = row_sq_norms(x).to(out)
            self._norms = out
        return self._norms

    def owns(self, point: int) -> bool:
        return self.start <= point < self.stop
