"""torch.distributed set-up from the task's environment, and small collectives.

The same code runs with world size 1 (no process group, collectives are no-ops), N local
processes (the local launcher or torchrun) or N SLURM tasks: rank, world size and the
rendezvous address come from the ``TaskEnvironment`` of the launcher that started us
(``lib.runtime.environment``).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lib.runtime.environment import TaskEnvironment, current_environment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def resolve_dist_env(env: TaskEnvironment | None = None) -> DistEnv:
    """Rank, world size, local rank and rendezvous of this process."""
    env = env or current_environment()
    rank, world = env.rank_world()
    addr, port = env.rendezvous()
    return DistEnv(rank, world, env.local_rank(), addr, port)


def pick_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_kwargs(
    de: DistEnv, device: torch.device, timeout_s: float, *, shared_gpu: bool = False
) -> dict[str, object]:
    """``init_process_group``'s arguments for this rank. On CUDA the NCCL group is bound to
    the rank's device (``device_id``), so NCCL never guesses it (a ``barrier()`` on an
    unbound group picks the device from the global rank: the wrong one, or an invalid
    ordinal). ``shared_gpu``: ranks may share a GPU, which NCCL refuses ("duplicate GPU"),
    so they use gloo (``Comm`` stages CUDA tensors through host memory)."""
    backend = "gloo" if shared_gpu else pick_backend(device)
    kwargs: dict[str, object] = dict(
        backend=backend,
        init_method=f"tcp://{de.master_addr}:{de.master_port}",
        rank=de.rank,
        world_size=de.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    if backend == "nccl":
        kwargs["device_id"] = device
    return kwargs


@contextlib.contextmanager
def process_group(
    device: torch.device | None = None, timeout_s: float = 1800.0, *, shared_gpu: bool = False
) -> Iterator[DistEnv]:
    """Initialise torch.distributed for world size > 1 and tear it down afterwards.

    ``device``: this rank's device, already resolved (``lib.compute.devices``); on CUDA it
    is made current before the group exists and the NCCL group is bound to it.
    ``shared_gpu``: ranks may share a GPU (``cluster.share_gpus``): gloo, not NCCL."""
    de = resolve_dist_env()
    device = device or torch.device("cpu")
    if de.world_size > 1 and not dist.is_initialized():
        kwargs = init_kwargs(de, device, timeout_s, shared_gpu=shared_gpu)
        log.info(
            "rank %d of %d: rendezvous at tcp://%s:%d (%s%s)",
            de.rank,
            de.world_size,
            de.master_addr,
            de.master_port,
            kwargs["backend"],
            f" on {device}" if device.type == "cuda" else "",
        )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(**kwargs)
        try:
            yield de
        finally:
            dist.destroy_process_group()
    else:
        yield de


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op with one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's ``tensor`` along dim 0 in rank order (sizes may differ)."""
    if not is_distributed():
        return tensor
    sizes, padded = _padded_to_longest(tensor)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return _unpad(parts, sizes)


def _padded_to_longest(tensor: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Every rank's row count, and ``tensor`` zero-padded to the longest (collectives need
    equal shapes)."""
    n = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    counts = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    return sizes, padded


def _unpad(parts: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_rows(tensor: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
    """Concatenate each rank's ``tensor`` along dim 0 on rank ``dst`` only (sizes may differ).

    Returns the concatenation on ``dst`` and ``None`` elsewhere; with one process, the
    tensor itself. Unlike ``all_gather_rows`` the other ranks hold no copy of the result,
    so a large per-row output (an assignment of every point) costs memory on one rank only.
    """
    if not is_distributed():
        return tensor
    sizes, padded = _padded_to_longest(tensor)
    parts = [torch.empty_like(padded) for _ in sizes] if rank() == dst else None
    dist.gather(padded, gather_list=parts, dst=dst)
    return None if parts is None else _unpad(parts, sizes)
