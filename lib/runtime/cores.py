"""The cores a task may use."""

from __future__ import annotations

import os

# Set by the local launcher per concurrent task (its share of the cores), so that backends
# that pin threads (vLLM's CPU build) never put two tasks on one core.
ENV_CPU_CORES = "EMBEDFLEET_CPU_CORES"


def usable_cores() -> list[int]:
    """The cores this process may run on: its affinity mask (a SLURM allocation's cgroup,
    a taskset), or all cores where the OS has no such mask."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))
