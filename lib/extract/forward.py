"""The forward pass of the extract stage, whichever backend runs it: ``open_forward``
gives a ``Forward`` that turns a batch of samples into the requested hidden states of
their non-padding tokens. Everything around it (samples, batches, the writer, shards,
markers, resume) is the same for both backends."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from lib.extract.model import ModelSource
from lib.extract.params import ExtractBackend


class Forward(Protocol):
    name: str
    layers: list[int]  # checked against the model, sorted
    hidden_size: int
    compute_dtype: str
    # CUDA out-of-memory halvings of this task ({rows, tokens, retry_rows}), for its metadata
    oom_halvings: list[dict[str, int]]

    def __call__(self, batch: list) -> dict[int, np.ndarray]:
        """{layer: (tokens, hidden)} for the batch's samples one after another, in the
        stored dtype (bf16 as its uint16 bits)."""
        ...

    def close(self) -> None: ...


def open_forward(p: Any, source: ModelSource, pad_id: int) -> Forward:
    """The backend ``p.backend`` names with the model loaded. Raises ``ConfigError``
    (layers, mesh, device), ``ModelError`` (model unreadable)."""
    if ExtractBackend(str(p.backend)) == ExtractBackend.jax:
        from lib.extract.jax_forward import JaxForward

        return JaxForward(source, p, pad_id)
    from lib.extract.model import TorchForward

    return TorchForward(source, p, pad_id)
