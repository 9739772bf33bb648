"""The collectives of one computation: over the job's ranks, or none.

``Comm.current()`` is the process group set up by ``lib.compute.distributed.process_group``
(world size 1 when there is none); ``Comm.solo()`` is a problem one rank solves alone
inside a distributed job. With world size 1 every collective is a no-op. Small CPU-side
values (flags, counts, row ids) are staged onto the GPU when the backend is NCCL; CUDA
tensors through host memory when it is gloo (ranks that share a GPU, which NCCL refuses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lib.compute import distributed as D


def _backend() -> str | None:
    dist = torch.distributed
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


@dataclass(frozen=True)
class Comm:
    """Collectives over the job's ranks, or none (``solo``)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Comm:
        """The process group of ``lib.compute.distributed.process_group`` (or world size 1)."""
        return cls(D.rank(), D.world_size())

    @classmethod
    def solo(cls) -> Comm:
        """No collectives: this rank solves the problem alone."""
        return cls(0, 1)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def _staged(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor on a device the backend can reduce: NCCL needs CUDA tensors (some of
        our collectives carry small CPU-side values: flags, counts, row ids), and gloo is
        given host tensors whatever their device."""
        backend = _backend()
        if tensor.device.type == "cpu" and backend == "nccl":
            return tensor.to(torch.device("cuda", torch.cuda.current_device()))
        if tensor.device.type == "cuda" and backend == "gloo":
            return tensor.cpu()
        return tensor

    def _all_reduce(self, tensor: torch.Tensor, reduce) -> torch.Tensor:
        if self.world > 1:
            staged = self._staged(tensor)
            reduce(staged)
            if staged is not tensor:
                tensor.copy_(staged)
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        return self._all_reduce(tensor, D.all_reduce_sum_)

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Maximum over ranks, in place."""
        return self._all_reduce(tensor, D.all_reduce_max_)

    def check_on_root(self, check: Callable[[], None], error: type[Exception]) -> None:
        """Run ``check`` on rank 0 only; if it raises ``error``, every rank raises it (rank
        0 with its message, the others pointing at rank 0's log), so ranks fail together
        instead of the others waiting in the next collective."""
        message = ""
        if self.is_root:
            try:
                check()
            except error as exc:
                message = str(exc) or type(exc).__name__
        failed = self.max_(torch.tensor([1 if message else 0], dtype=torch.int64))
        if int(failed.item()):
            raise error(
                message or "rank 0 found a problem (see rank 0's log); rerun the same command"
            )

    def all_gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return tensor
        return D.all_gather_rows(self._staged(tensor)).to(tensor.device)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """Rows of every rank, concatenated on rank 0; ``None`` on the others."""
        if self.world == 1:
            return tensor
        out = D.gather_rows(self._staged(tensor), 0)
        return None if out is None else out.to(tensor.device)

    def barrier(self) -> None:
        if self.world > 1:
            D.barrier()
