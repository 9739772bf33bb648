"""The GPU suite: collected only with ``pytest -m gpu`` (bench/gpu/run.sh). It fails, never
skips, on a machine without CUDA: asking for it there is a mistake worth seeing."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _cuda_required():
    assert torch.cuda.is_available(), (
        "the gpu suite needs an NVIDIA GPU and the CUDA build of torch (torch "
        f"{torch.__version__} sees no GPU): see bench/gpu/README.md for the install command"
    )
