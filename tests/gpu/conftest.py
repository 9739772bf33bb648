"""The GPU suite: collected only with ``pytest -m gpu`` (bench/gpu/run.sh). It fails, never
skips, on a machine without CUDA: asking for it there is a mistake worth seeing."""

from __future__ import annotations

import os

import pytest
import torch

# JAX takes 75% of the GPU's memory at its first use unless told not to; the torch tests
# beside it (a real out-of-memory under a memory cap among them) need theirs.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@pytest.fixture(autouse=True)
def _cuda_required():
    assert torch.cuda.is_available(), (
        "the gpu suite needs an NVIDIA GPU and the CUDA build of torch (torch "
        f"{torch.__version__} sees no GPU): see bench/gpu/README.md for the install command"
    )
