"""Starting a 32-task stage on 32 namespace hosts: cluster=hosts vs the seed's bash loop
(`for i ...; do ssh HOST "nohup python ... &" & done; wait`), in one run.

Needs root and the namespace hosts (this starts them: EMBEDFLEET_NS_HOSTS=N up.sh). The
stage is trivial (tests/unit/launchers/echo_job.py: identity, one line, a marker), one
task per host. Measured, each variant into a fresh run dir, alternating:
  - all running: from the start to every task's process having started (its pid file;
    for the loop, every ssh returned after its `nohup ... &`);
  - all markers: to every completion marker present (launch() returning for embedfleet);
  - embedfleet's launcher: peak RSS of this process's growth and the most open fds
    during the launch (sampled every 10 ms).
The loop does what embedfleet does not need to (nothing): no per-task exit code, no
retry, no host-key refusal message; its output goes to per-task logs like ours.

    .venv/bin/python bench/bench_multihost.py [--hosts 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf

from bench._util import machine
from launchers.hosts.launcher import HostsLauncher
from lib.config.schema import EmbedfleetConfig
from lib.core.paths import RunPaths
from lib.plan.spec import ARRAY, Plan, StageSpec

REPO = Path(__file__).resolve().parents[1]
JOB = "tests.unit.launchers.echo_job"
UP = REPO / "scripts/hosts/up.sh"


def hosts_env(n: int) -> dict[str, str]:
    env = dict(os.environ, EMBEDFLEET_NS_HOSTS=str(n))
    path = subprocess.run([str(UP)], env=env, capture_output=True, text=True, check=True)
    out = {}
    for line in Path(path.stdout.strip()).read_text().splitlines():
        k, _, v = line.partition("=")
        out[k] = " ".join(shlex.split(v))
    return out


def _spec(n: int) -> StageSpec:
    return StageSpec("trivial", "embed", JOB, "trivial", ARRAY, n, "h")


def run_embedfleet(env: dict, names: list[str], run: Path) -> dict:
    hosts = [
        {"address": env[f"EF_HOST_{h}"], "port": int(env["EF_HOSTS_PORT"]), "name": h}
        for h in names
    ]
    cfg = OmegaConf.merge(
        OmegaConf.structured(EmbedfleetConfig),
        {
            "cluster": {
                "launcher": "hosts",
                "hosts": hosts,
                "multihost": {
                    "user": env["EF_NS_USER"],
                    "key_file": env["EF_HOSTS_KEY"],
                    "known_hosts": env["EF_HOSTS_KNOWN_HOSTS"],
                    "poll_s": 0.2,
                },
            }
        },
    )
    spec = _spec(len(names))
    paths = RunPaths(str(run))
    launcher = HostsLauncher(cfg, echo=False)
    pids = [
        Path(paths.storage.local_file(paths.remote_proc(spec.stage_dir, t, 0, 1, "pid")))
        for t in range(spec.num_tasks)
    ]
    result: dict = {}
    fds = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            fds[0] = max(fds[0], len(os.listdir("/proc/self/fd")))
            if "running" not in result and all(p.exists() for p in pids):
                result["running"] = time.perf_counter() - t0
            time.sleep(0.01)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = launcher.launch(paths, Plan([spec], 0))
    result["markers"] = time.perf_counter() - t0
    done.set()
    th.join()
    assert out.complete, out
    result["fds"] = fds[0]
    result["rss_growth_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    return result


def run_loop(env: dict, names: list[str], run: Path) -> dict:
    """The seed's loop: one backgrounded ssh per host, `wait`, then poll for markers."""
    spec = _spec(len(names))
    paths = RunPaths(str(run))
    (run / "logs").mkdir(parents=True)
    lines = []
    for t, h in enumerate(names):
        remote = (
            f"cd {shlex.quote(str(REPO))} && EMBEDFLEET_LAUNCHER=local EMBEDFLEET_RUN_DIR="
            f"{shlex.quote(str(run))} EMBEDFLEET_TASK_INDEX={t} EMBEDFLEET_NUM_TASKS="
            f"{len(names)} PYTHONPATH=. nohup {shlex.quote(sys.executable)} -m {JOB} "
            f"--run-dir {shlex.quote(str(run))} --stage trivial > {run}/logs/{t}.log 2>&1 &"
        )
        lines.append(
            f"ssh -p {env['EF_HOSTS_PORT']} -i {env['EF_HOSTS_KEY']} -o BatchMode=yes "
            f"-o UserKnownHostsFile={env['EF_HOSTS_KNOWN_HOSTS']} "
            f"{env['EF_NS_USER']}@{env[f'EF_HOST_{h}']} {shlex.quote(remote)} &"
        )
    script = "\n".join(lines) + "\nwait\n"
    markers = [
        Path(paths.storage.local_file(paths.marker(spec.stage_dir, t)))
        for t in range(spec.num_tasks)
    ]
    t0 = time.perf_counter()
    subprocess.run(["bash", "-c", script], check=True)
    # Every ssh returned: every task process has been started (nohup ... &).
    result = {"running": time.perf_counter() - t0}
    while not all(p.exists() for p in markers):
        time.sleep(0.01)
    result["markers"] = time.perf_counter() - t0
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/efmultihostbench")
    args = ap.parse_args()
    env = hosts_env(args.hosts)
    names = env["EF_NS_HOSTS_NAMES"].split()[: args.hosts]
    assert len(names) == args.hosts, names
    base = Path(args.dir)
    subprocess.run(["rm", "-rf", str(base)], check=True)
    results: dict[str, list[dict]] = {"embedfleet": [], "bash loop": []}
    for r in range(args.repeats):
        for name, fn in (("bash loop", run_loop), ("embedfleet", run_embedfleet)):
            res = fn(env, names, base / f"{name.replace(' ', '_')}{r}")
            results[name].append(res)
            print(name, json.dumps({k: round(v, 3) for k, v in res.items()}), flush=True)
    print(f"\nmachine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    print(f"{args.hosts} tasks on {args.hosts} namespace hosts, median of {args.repeats}:")
    for name, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"  {name:<11} " + "  ".join(f"{k} {v:.2f}" for k, v in med.items()))
    run = statistics.median(r["running"] for r in results["embedfleet"])
    loop = statistics.median(r["running"] for r in results["bash loop"])
    print(f"  all running: embedfleet / loop = {run / loop:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
