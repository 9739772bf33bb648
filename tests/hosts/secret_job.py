"""A tiny job for the pass_env test: records a digest of ``$EF_TEST_SECRET_TOKEN`` (never the
value) and whether the value shows in any process's argv on its host (``ps -eww``, while
this task's own ``sh`` is alive), then writes its marker."""

import hashlib
import os
import subprocess
import sys

from lib.core.markers import CompletionMarker, write_marker
from tests.job_start import job_start


def main() -> int:
    args, ident, paths = job_start()
    value = os.environ.get("EF_TEST_SECRET_TOKEN")
    ps = subprocess.run(["ps", "-eww", "-o", "args="], capture_output=True, text=True).stdout
    record = {
        "sha256": hashlib.sha256(value.encode()).hexdigest() if value is not None else None,
        "in_ps": bool(value) and any(part in ps for part in value.splitlines() if part),
        # this task's own shell (its script on its command line) is among what ps saw
        "saw_task_shell": f"--stage {args.stage}" in ps and "mv -f" in ps,
    }
    paths.storage.publish_json(f"{args.stage}/out/{ident.task_index}.json", record)
    print(f"secret job {ident.task_index}: set={value is not None}", flush=True)
    marker = CompletionMarker(args.stage, ident.task_index, ident.num_tasks, "h")
    write_marker(paths.storage, paths.marker(args.stage, ident.task_index), marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
