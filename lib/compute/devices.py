"""One device resolver for every stage: ``auto`` | ``cpu`` | ``cuda`` -> a torch device.

The enums are parameter types of the stages' config nodes, so this module imports torch
only when a device is resolved: loading the schema (every job does) stays light.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from lib.core.errors import ConfigError

if TYPE_CHECKING:
    import torch


class Device(StrEnum):
    auto = "auto"  # CUDA when a GPU is visible, else the CPU
    cpu = "cpu"
    cuda = "cuda"


class ModelDtype(StrEnum):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def resolve_device(
    device: Device | str | torch.device, *, local_rank: int | None = None, key: str = "device"
) -> torch.device:
    """The torch device for a setting.

    ``auto``: CUDA if a GPU is visible, else the CPU. ``cuda`` without an index:
    ``cuda:<local_rank>`` (one GPU per rank of a distributed job; default: the task
    environment's local rank), made the current device so NCCL collectives use it. Raises ``ConfigError`` naming
    ``key`` when CUDA is asked for and none is visible.
    """
    import torch

    if isinstance(device, torch.device):
        dev = device
    else:
        name = Device(str(device))
        if name == Device.auto:
            name = Device.cuda if torch.cuda.is_available() else Device.cpu
        if name == Device.cuda and not torch.cuda.is_available():
            raise ConfigError(f"{key}=cuda but no CUDA device is visible; use {key}=cpu")
        dev = torch.device(name.value)
    if dev.type == "cuda":
        if dev.index is None:
            if local_rank is None:
                from lib.runtime.environment import current_environment

                local_rank = current_environment().local_rank()
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def pick_dtype(dtype: ModelDtype | str, device: torch.device) -> torch.dtype:
    """A model's compute dtype: ``auto`` is bf16 on a GPU and fp32 on the CPU."""
    import torch

    dtype = ModelDtype(str(dtype))
    if dtype == ModelDtype.auto:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype.value)
