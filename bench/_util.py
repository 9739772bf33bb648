"""Shared bench helpers: machine description, child-process timing with peak RSS."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}"


# A minimal process that forks the command and reports its rusage: forking straight from
# this (large) Python would hand the child our RSS high-water mark.
_RUNNER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write("\\n@@RUSAGE " + json.dumps({"code": os.waitstatus_to_exitcode(status),
    "maxrss_kib": usage.ru_maxrss, "wall": time.perf_counter() - t0}) + "\\n")
"""


def child_peak_rss(
    cmd: list[str], env: dict | None = None, cwd: Path = REPO
) -> tuple[float, float, str]:
    """Run ``cmd`` in a fresh process; return (wall seconds, its peak RSS in MiB, stdout)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-S", "-c", _RUNNER, *cmd], env=full_env, cwd=cwd, capture_output=True
    )
    err = proc.stderr.decode(errors="replace")
    marker = err.rsplit("@@RUSAGE ", 1)
    if len(marker) != 2:
        raise RuntimeError(f"{cmd} did not report rusage:\n{err[-3000:]}")
    info = json.loads(marker[1])
    if info["code"] != 0:
        raise RuntimeError(f"{cmd} failed ({info['code']}):\n{marker[0][-3000:]}")
    return info["wall"], info["maxrss_kib"] / 1024, proc.stdout.decode(errors="replace")


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "python": sys.version.split()[0], **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
