"""A tiny job for the local launcher's tests: writes what it was told (identity and
environment) to ``<stage>/out/``, prints a line, then a marker; fails, sleeps or leaves a
child process behind, or ignores SIGTERM, when ``cluster.env`` asks it to. It says it is
ready (``lib.runtime.ready``) at once, or after ``ECHO_LOAD_S`` seconds of "loading"
(recorded as ``loading: [begin, ready]``)."""

import os
import signal
import subprocess
import sys
import time

from lib.core.markers import CompletionMarker, write_marker
from lib.runtime.ready import mark_ready
from tests.job_start import job_start

SEEN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "EMBEDFLEET_HOST",
        "EMBEDFLEET_CPU_CORES",
        "OMP_NUM_THREADS", "EMBEDFLEET_LAUNCHER")  # fmt: skip


def main() -> int:
    args, ident, paths = job_start()
    record = {k: os.environ.get(k) for k in SEEN}
    record.update(task=ident.task_index, rank=ident.rank, world=ident.world_size, pid=os.getpid())
    began = time.time()
    if os.environ.get("ECHO_LOAD_S"):
        time.sleep(float(os.environ["ECHO_LOAD_S"]))
    mark_ready()
    record["loading"] = [began, time.time()]
    paths.storage.publish_json(f"{args.stage}/out/{ident.task_index}.{ident.rank}.json", record)
    print(f"hello from task {ident.task_index} rank {ident.rank}", flush=True)
    if os.environ.get("ECHO_FAIL_TASK") == str(ident.task_index):
        print("failing on purpose", flush=True)
        return 3
    if os.environ.get("ECHO_IGNORE_TERM"):  # a task stuck where SIGTERM cannot stop it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("ECHO_SLEEP"):
        time.sleep(float(os.environ["ECHO_SLEEP"]))
    if os.environ.get("ECHO_CHILD"):
        child = subprocess.Popen(["sleep", "300"])
        paths.storage.publish_json(f"{args.stage}/out/child.json", {"pid": child.pid})
    if ident.rank == 0:
        marker = CompletionMarker(args.stage, ident.task_index, ident.num_tasks, "h")
        write_marker(paths.storage, paths.marker(args.stage, ident.task_index), marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
