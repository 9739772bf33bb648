"""One device resolver for every stage: ``auto`` | ``cpu`` | ``cuda`` -> a torch device,
and which GPUs each process of a local launch gets.

GPU binding: a process the local launcher starts sees only its own GPUs
(``CUDA_VISIBLE_DEVICES``: one per rank of a distributed stage, ``per_task`` per task of a
sharded one, e.g. vLLM's ``tensor_parallel_size``). Inside a process, local rank ``r`` takes
visible device ``r % device_count()``; more ranks than GPUs is refused unless sharing was
asked for (``cluster.share_gpus``). The enums are parameter types of the stages' config
nodes, so this module imports torch only when a device is resolved: loading the schema
(every job does) stays light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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


SHARE_KEY = "cluster.share_gpus"


def rank_devices(
    num_gpus: int, ranks: int, *, per_rank: int = 1, share: bool = False
) -> list[tuple[int, ...]]:
    """The GPU indices (of ``num_gpus``) each of ``ranks`` processes on one host gets.

    Rank ``r`` gets GPUs ``r*per_rank .. r*per_rank+per_rank-1``; with ``share``, ranks
    beyond the GPUs wrap round (modulo ``num_gpus``). ``num_gpus <= 0``: no binding (empty
    tuples). Raises ``ConfigError`` when ``per_rank`` exceeds ``num_gpus``, or the ranks need
    more GPUs than there are and ``share`` is off.
    """
    if ranks < 1 or per_rank < 1:
        raise ValueError(f"ranks={ranks} and per_rank={per_rank} must be >= 1")
    if num_gpus <= 0:
        return [() for _ in range(ranks)]
    if per_rank > num_gpus:
        raise ConfigError(
            f"a task needs {per_rank} GPUs (embed.vllm.tensor_parallel_size) but "
            f"cluster.num_gpus={num_gpus}: raise cluster.num_gpus or lower the tensor "
            "parallel size"
        )
    if ranks * per_rank > num_gpus and not share:
        need = f"{ranks} rank(s)" + (f" x {per_rank} GPUs" if per_rank > 1 else "")
        raise ConfigError(
            f"{need} need more than cluster.num_gpus={num_gpus} GPUs: lower the world size, "
            f"raise cluster.num_gpus, or set {SHARE_KEY}=true to run several ranks on one GPU "
            "(each then needs to fit in its share of the GPU's memory)"
        )
    return [tuple((r * per_rank + j) % num_gpus for j in range(per_rank)) for r in range(ranks)]


def stage_uses_gpus(cfg: Mapping, group: str) -> bool:
    """Whether a stage's tasks get GPUs: its config node (``cfg[group]``) has a ``device``
    other than ``cpu`` (embed, kmeans). Stages without one (merge, curate, metrics) run on
    the CPU and are bound to no GPU."""
    node = cfg.get(group)
    device = node.get("device") if isinstance(node, Mapping) else None
    return device is not None and str(device) != Device.cpu


def local_device_env(
    num_gpus: int,
    *,
    slot: int,
    rank: int,
    world: int,
    per_task: int = 1,
    share: bool = False,
    parent_visible: str | None = None,
) -> dict[str, str]:
    """The device variables of one process the local launcher starts.

    Takes ``cluster.num_gpus``, the task's slot (0.. tasks at once) or, for a distributed
    stage (``world > 1``), its rank; ``per_task``: GPUs of one task of a sharded stage.
    Returns ``CUDA_VISIBLE_DEVICES`` (its own GPUs) when ``num_gpus > 0``, and
    ``LOCAL_RANK`` for a rank; ``LOCAL_WORLD_SIZE`` when the ranks see the same devices
    (no binding), so that a rank can refuse to share one it was not told to share.
    ``parent_visible``: the launcher's own ``CUDA_VISIBLE_DEVICES`` (inside a SLURM
    allocation, say): GPU ``i`` is then its ``i``-th entry. Raises ``ConfigError`` as
    ``rank_devices`` does, or when ``parent_visible`` lists fewer than ``num_gpus``.
    """
    env: dict[str, str] = {}
    if world > 1:
        env["LOCAL_RANK"] = str(rank)
        if num_gpus > 0:
            gpus = rank_devices(num_gpus, world, share=share)[rank]
        else:
            env["LOCAL_WORLD_SIZE"] = str(world)
            return env
    elif num_gpus > 0:
        gpus = rank_devices(num_gpus, slot + 1, per_rank=per_task, share=share)[slot]
    else:
        return env
    names = [str(g) for g in range(num_gpus)]
    if parent_visible:
        names = [v.strip() for v in parent_visible.split(",") if v.strip()]
        if len(names) < num_gpus:
            raise ConfigError(
                f"cluster.num_gpus={num_gpus} but CUDA_VISIBLE_DEVICES={parent_visible} "
                f"makes {len(names)} GPU(s) visible to the launcher: lower cluster.num_gpus"
            )
    env["CUDA_VISIBLE_DEVICES"] = ",".join(names[g] for g in gpus)
    return env


def describe_local_gpus(
    num_gpus: int, per_task: int, distributed: Mapping[str, int], *, share: bool = False
) -> str | None:
    """One line for the plan: which GPUs the tasks of a local launch get, or None without
    GPUs. ``distributed``: world size of each distributed stage. Raises ``ConfigError``
    (before anything runs) as ``rank_devices`` does."""
    if num_gpus <= 0:
        return None
    tasks = num_gpus // per_task if per_task <= num_gpus else 0
    rank_devices(num_gpus, max(1, tasks), per_rank=per_task, share=share)
    parts = [
        f"GPUs: {num_gpus} (cluster.num_gpus); sharded stages run {tasks} task(s) at once, "
        f"{per_task} GPU(s) each" + (" (embed.vllm.tensor_parallel_size)" if per_task > 1 else "")
    ]
    for name, world in distributed.items():
        if world > 1:
            gpus = rank_devices(num_gpus, world, share=share)
            shared = " (shared: cluster.share_gpus)" if world > num_gpus else ""
            parts.append(f"{name}: ranks on GPUs {','.join(str(g[0]) for g in gpus)}{shared}")
    return "; ".join(parts)


def local_world_size(env: Mapping[str, str] | None = None) -> int | None:
    """Ranks on this host that see the same GPUs (``LOCAL_WORLD_SIZE``, set by torchrun
    and by the local launcher when it binds none), or None when unknown."""
    value = (os.environ if env is None else env).get("LOCAL_WORLD_SIZE")
    return int(value) if value else None


def gpu_index(
    local_rank: int, device_count: int, *, local_world: int | None = None, share: bool = False
) -> int:
    """The visible CUDA device of local rank ``local_rank``: ``local_rank % device_count``.

    A process bound to its own GPU sees one device and takes it. Raises ``ConfigError``
    when ``local_world`` ranks would share fewer GPUs and ``share`` is off."""
    if device_count < 1:
        raise ConfigError("no CUDA device is visible")
    if local_world is not None and local_world > device_count and not share:
        raise ConfigError(
            f"{local_world} ranks on this host but {device_count} GPU(s) visible: rank "
            f"{local_rank} would share a GPU. Set cluster.num_gpus (one GPU per rank), lower "
            f"the world size, use device=cpu, or set {SHARE_KEY}=true to share"
        )
    return local_rank % device_count


def resolve_device(
    device: Device | str | torch.device,
    *,
    local_rank: int | None = None,
    local_world: int | None = None,
    share: bool = False,
    key: str = "device",
) -> torch.device:
    """The torch device for a setting.

    ``auto``: CUDA if a GPU is visible, else the CPU. ``cuda`` without an index: visible
    device ``local_rank % device_count()`` (``gpu_index``; ``local_rank`` defaults to the
    task environment's, ``local_world`` to ``LOCAL_WORLD_SIZE``), made the current device
    so NCCL collectives use it. Raises ``ConfigError`` naming ``key`` when CUDA is asked
    for and none is visible, and as ``gpu_index`` does.
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
            if local_world is None:
                local_world = local_world_size()
            index = gpu_index(
                local_rank, torch.cuda.device_count(), local_world=local_world, share=share
            )
            dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    return dev


def pick_dtype(dtype: ModelDtype | str, device: torch.device) -> torch.dtype:
    """A model's compute dtype: ``auto`` is bf16 on a GPU and fp32 on the CPU."""
    import torch

    dtype = ModelDtype(str(dtype))
    if dtype == ModelDtype.auto:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype.value)


# cuBLAS/cuDNN report a failed allocation as a plain RuntimeError.
_OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says a device allocation failed (torch, cuBLAS or cuDNN)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


def free_device_memory(device: torch.device | str) -> None:
    """Return what the last (failed) forward pass held to the device's allocator. Call it
    after leaving the ``except`` block: the exception's traceback holds that pass's
    tensors while the handler runs (a retry inside it runs out of memory again)."""
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
