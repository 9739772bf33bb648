"""numpy <-> torch without copies, and dtype names."""

from __future__ import annotations

import warnings

import numpy as np
import torch

_TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; raises ``ValueError`` naming the allowed values."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _TORCH_DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_TORCH_DTYPES)}") from None


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing memory with ``array`` (also for read-only memmaps).

    The tensor is only ever read; torch warns about read-only buffers because it cannot
    know that, so the warning is silenced here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(array))
