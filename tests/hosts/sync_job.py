"""A tiny job for the ``cluster.multihost.storage=sync`` tests: writes one output (a few
KiB naming its task and the run dir it was given) and a marker naming it with its size
and sha256. On the host named by ``SYNC_JOB_BAD_HOST`` the marker states another sha256
(as when a file changes after its marker was written), so pulling it from there fails."""

import os
import sys

from lib.core.markers import CompletionMarker, write_marker
from lib.core.storage import OutputFile
from tests.job_start import job_start


def main() -> int:
    args, ident, paths = job_start()
    data = (f"task {ident.task_index} in {args.run_dir}\n" * 200).encode()
    out = paths.storage.publish_bytes(f"{args.stage}/data/{ident.task_index}.txt", data)
    if os.environ.get("SYNC_JOB_BAD_HOST") == os.environ.get("EMBEDFLEET_HOST"):
        out = OutputFile(out.path, out.bytes, "0" * 64)
    print(f"task {ident.task_index} wrote {out.path}", flush=True)
    marker = CompletionMarker(args.stage, ident.task_index, ident.num_tasks, "h", outputs=[out])
    write_marker(paths.storage, paths.marker(args.stage, ident.task_index), marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
