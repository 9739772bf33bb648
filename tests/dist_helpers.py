"""Run a function in a real multi-process torch.distributed world (gloo) for tests.

``run_world(fn, world_size, *args)`` starts ``world_size`` processes with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, calls ``fn(*args)`` inside
``lib.compute.distributed.process_group()`` in each, and returns the list of return values in rank
order. ``fn`` must be a module-level function (it is pickled to the spawned processes by
torch.multiprocessing; this is our own test code, not user data).
"""

from __future__ import annotations

import os
import socket
import time
from queue import Empty
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, fn, args, queue) -> None:  # pragma: no cover
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    from lib.compute.distributed import process_group

    try:
        with process_group():
            result = fn(*args)
        queue.put((rank, "ok", result))
    except BaseException as exc:
        import traceback

        queue.put((rank, "error", f"{exc!r}\n{traceback.format_exc()}"))
        raise


def run_world(fn, world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    deadline = time.time() + timeout
    while len(results) + len(errors) < len(procs):
        try:
            rank, status, value = queue.get(timeout=1.0)
        except Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.time() > deadline:  # a rank died before it could report
                for p in procs:
                    p.kill()
                raise RuntimeError(
                    f"distributed test world failed: exit codes {[p.exitcode for p in procs]}"
                ) from None
            continue
        if status == "ok":
            results[rank] = value
        else:
            errors.append(f"rank {rank}: {value}")
    for p in procs:
        p.join(timeout=60)
    if errors:
        raise RuntimeError("distributed test world failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
