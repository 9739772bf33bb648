"""torch.distributed set-up from whichever environment started us, and small collectives.

The same code runs with world size 1 (no process group, collectives are no-ops), N local
processes (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set by the local launcher or torchrun),
or N SLURM tasks (SLURM_PROCID/SLURM_NTASKS; master = first host of the allocation, port
derived from the job id so concurrent jobs do not collide).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lib.sharding import contiguous_range  # noqa: F401  (re-exported for rank row blocks)
from lib.task import resolve_rank_world

PORT_BASE = 20000
PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist (``node[01-04],gpu7`` -> ``node01``)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def slurm_port(job_id: int) -> int:
    """A rendezvous port derived from the job id (stable for all ranks of a job)."""
    return PORT_BASE + job_id % PORT_SPAN


def resolve_dist_env(env: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if env is None else env
    rank, world = resolve_rank_world(env)
    local_rank = int(env.get("LOCAL_RANK") or env.get("SLURM_LOCALID") or 0)
    addr = env.get("MASTER_ADDR")
    port = env.get("MASTER_PORT")
    if addr is None and "SLURM_JOB_NODELIST" in env and world > 1:
        addr = first_slurm_host(env["SLURM_JOB_NODELIST"])
    if port is None and "SLURM_JOB_ID" in env:
        port = str(slurm_port(int(env["SLURM_JOB_ID"])))
    return DistEnv(rank, world, local_rank, addr or "127.0.0.1", int(port or 29500))


def pick_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(
    device: torch.device | None = None, timeout_s: float = 1800.0
) -> Iterator[DistEnv]:
    """Initialise torch.distributed for world size > 1 and tear it down afterwards."""
    de = resolve_dist_env()
    device = device or torch.device("cpu")
    if de.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=pick_backend(device),
            init_method=f"tcp://{de.master_addr}:{de.master_port}",
            rank=de.rank,
            world_size=de.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
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


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(tensor, src=src)
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
