"""What a task process has used so far: peak resident memory (its own, and the largest of
its finished child processes), peak CUDA memory, CPU seconds.

Read from ``getrusage`` (``RUSAGE_SELF`` and ``RUSAGE_CHILDREN``; ``ru_maxrss`` is KiB on
Linux, bytes on macOS) and, only when the task already initialized CUDA through torch,
``torch.cuda.max_memory_allocated`` summed over its devices: this module never imports
torch or initializes CUDA itself. Children count only once they have exited and been
waited for (a worker pool that is still running is not in ``RUSAGE_CHILDREN``).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class ResourceUsage:
    peak_rss_bytes: int
    peak_rss_children_bytes: int
    cpu_seconds: float  # user + system, this process and its waited-for children
    peak_cuda_bytes: int | None  # None: CUDA was not used


def _maxrss_bytes(usage: resource.struct_rusage) -> int:
    scale = 1 if sys.platform == "darwin" else 1024
    return int(usage.ru_maxrss) * scale


def peak_cuda_bytes() -> int | None:
    """Peak bytes allocated by torch on all CUDA devices of this process; None unless
    torch is imported and CUDA initialized."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        return int(
            sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
        )
    except Exception:  # a broken driver must not stop a finished task's marker
        return None


def current_usage() -> ResourceUsage:
    """This process's usage so far (see the module doc)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return ResourceUsage(
        peak_rss_bytes=_maxrss_bytes(own),
        peak_rss_children_bytes=_maxrss_bytes(children),
        cpu_seconds=round(float(cpu), 3),
        peak_cuda_bytes=peak_cuda_bytes(),
    )
