"""Principal components of the merged embeddings with bounded memory.

The covariance is accumulated in float64 over row blocks read with ``pread`` into one
reused buffer (touched pages of a memory map would count in the task's resident set, so
the map only describes the file): memory is D x D float64 (8 MiB at D = 1024) plus one
block, whatever the row count. Rows are shifted by the first block's mean before they
are summed, so the one-pass formula keeps its precision when the mean is large.

The same pass sums each source's rows (for the source x source similarity of means) and
keeps every row's L2 norm; a second pass (``component_scores``) projects every row on the
first components, for the texts at both ends of each.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lib.formats.matrix_reader import MatrixReader


@dataclass
class Moments:
    rows: int
    mean: np.ndarray  # (D,) float64
    covariance: np.ndarray  # (D, D) float64
    norms: np.ndarray  # (N,) float32, every row's L2 norm
    source_sums: np.ndarray | None  # (S, D) float64 when codes were given


def _rows(matrix: np.ndarray | MatrixReader) -> MatrixReader | np.ndarray:
    return MatrixReader(matrix) if isinstance(matrix, np.memmap) else matrix


def _blocks(src: MatrixReader | np.ndarray, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    if isinstance(src, MatrixReader):
        yield from src.chunks(block_rows)
    else:
        for start in range(0, len(src), block_rows):
            yield start, src[start : start + block_rows]


def streamed_moments(
    matrix: np.ndarray,
    block_rows: int,
    codes: np.ndarray | None = None,
    n_codes: int = 0,
) -> Moments:
    """Mean, covariance (float64, ddof 1), per-row norms and, with ``codes`` (one int per
    row, 0..n_codes-1), per-code row sums of ``matrix`` (a memmap is read by ``pread``).
    Raises ``ValueError`` for fewer than 2 rows."""
    src = _rows(matrix)
    n, d = (int(x) for x in matrix.shape)
    if n < 2:
        raise ValueError(f"principal components need at least 2 rows, the matrix has {n}")
    shift: np.ndarray | None = None
    total = np.zeros(d, dtype=np.float64)
    gram = np.zeros((d, d), dtype=np.float64)
    norms = np.empty(n, dtype=np.float32)
    sums = np.zeros((n_codes, d), dtype=np.float64) if codes is not None else None
    for start, raw in _blocks(src, block_rows):
        block = raw.astype(np.float64)
        if shift is None:
            shift = block.mean(axis=0)
        stop = start + len(block)
        norms[start:stop] = np.sqrt(np.einsum("ij,ij->i", block, block))
        if sums is not None:
            assert codes is not None
            _sum_by_code(sums, codes[start:stop], block)
        block -= shift
        total += block.sum(axis=0)
        gram += block.T @ block
    assert shift is not None
    centred_mean = total / n
    cov = (gram - n * np.outer(centred_mean, centred_mean)) / (n - 1)
    return Moments(n, shift + centred_mean, cov, norms, sums)


def _sum_by_code(sums: np.ndarray, codes: np.ndarray, block: np.ndarray) -> None:
    """``sums[c] += block[codes == c].sum(0)`` for every code, as one sparse product."""
    from scipy.sparse import csr_matrix

    onehot = csr_matrix(
        (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(sums), len(codes))
    )
    sums += onehot @ block


@dataclass
class Components:
    mean: np.ndarray  # (D,)
    vectors: np.ndarray  # (D, k) float64, columns are the components
    explained: np.ndarray  # (k,) explained-variance ratio of each
    total_variance: float


def principal_components(moments: Moments, k: int) -> Components:
    """The first ``k`` (at most D) components of ``moments``' covariance, signs fixed so
    each component's largest loading is positive (deterministic run to run)."""
    values, vectors = np.linalg.eigh(moments.covariance)
    order = np.argsort(values)[::-1][: min(k, len(values))]
    values = np.clip(values[order], 0.0, None)
    vectors = vectors[:, order]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    total = float(np.clip(np.trace(moments.covariance), 1e-300, None))
    return Components(moments.mean, vectors, values / total, total)


def project(rows: np.ndarray, comps: Components, k: int) -> np.ndarray:
    """``rows`` (n, D) on the first ``k`` components, (n, k) float32."""
    return ((np.asarray(rows, dtype=np.float64) - comps.mean) @ comps.vectors[:, :k]).astype(
        np.float32
    )


def component_scores(matrix: np.ndarray, comps: Components, k: int, block_rows: int) -> np.ndarray:
    """Every row of ``matrix`` on the first ``k`` components, (N, k) float32, streamed."""
    src = _rows(matrix)
    out = np.empty((int(matrix.shape[0]), k), dtype=np.float32)
    for start, block in _blocks(src, block_rows):
        out[start : start + len(block)] = project(block, comps, k)
    return out
