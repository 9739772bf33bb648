"""Sync of 16 shards (>= 1 GB) from two loopback sshd hosts: embedfleet's sync stage vs
`scp` of the same files vs the seed's sequential paramiko `sftp.get` loop, in one run.

Needs the test hosts (`make hosts-up`, root). Puts 8 random shards on each host
(cluster{c}_gpu{g}.pkl, reused when already there), then times, each into an empty local
directory, page cache of the remote files warm for all:
  1. scp: one `scp` per host, both at once (OpenSSH in C, its default cipher);
  2. seed: one paramiko connection per host, `sftp.get` of each file in turn (no checks);
  3. embedfleet: `python launch.py sync` (two tasks at once under the local launcher,
     `sync.parallel_files` files per host, remote sha256sum while downloading, resumable
     .part, atomic publish, markers): the whole launch, and the tasks' own sync time.

    .venv/bin/python bench/sync_bench.py [--mb-per-shard 64] [--parallel-files 4]
        [--ciphers aes128-gcm@openssh.com] [--variants] [--dir /tmp/efsyncbench]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paramiko

from bench._util import REPO, machine, save

HOSTS = ("h1", "h2")


def hosts_env() -> dict[str, str]:
    env_file = (
        subprocess.run(
            [str(REPO / "scripts/hosts/up.sh")], capture_output=True, text=True, check=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    out = {}
    for line in Path(env_file).read_text().splitlines():
        k, _, v = line.partition("=")
        out[k] = " ".join(shlex.split(v))
    return out


def make_shards(env: dict[str, str], mb: int) -> dict[str, Path]:
    dirs = {}
    for c, h in enumerate(HOSTS):
        d = Path(env["EF_HOSTS_DATA"]) / f"syncbench-{mb}mb" / f"cluster{c}"
        d.mkdir(parents=True, exist_ok=True)
        for p in (d, d.parent):
            p.chmod(0o755)
        for g in range(8):
            f = d / f"cluster{c}_gpu{g}.pkl"
            if not f.exists() or f.stat().st_size != mb << 20:
                with open(f, "wb") as fh:
                    for _ in range(mb):
                        fh.write(os.urandom(1 << 20))
            f.chmod(0o644)
        dirs[h] = d
    return dirs


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_scp(env, dirs, out: Path) -> None:
    procs = []
    for h in HOSTS:
        (out / h).mkdir(parents=True)
        src = f"{env['EF_HOSTS_USER']}@{env[f'EF_HOST_{h}']}:{dirs[h]}/cluster*_gpu*.pkl"
        cmd = ["scp", "-q", "-P", env["EF_HOSTS_PORT"], "-i", env["EF_HOSTS_KEY"], "-o",
               f"UserKnownHostsFile={env['EF_HOSTS_KNOWN_HOSTS']}", "-o", "BatchMode=yes",
               src, str(out / h)]  # fmt: skip
        procs.append(subprocess.Popen(cmd))
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError("scp failed")


def run_seed(env, dirs, out: Path) -> None:
    for h in HOSTS:  # the seed: one host after the other, one file after the other
        (out / h).mkdir(parents=True)
        client = paramiko.SSHClient()
        client.load_host_keys(env["EF_HOSTS_KNOWN_HOSTS"])
        client.connect(env[f"EF_HOST_{h}"], int(env["EF_HOSTS_PORT"]), env["EF_HOSTS_USER"],
                       key_filename=env["EF_HOSTS_KEY"], look_for_keys=False, allow_agent=False)  # fmt: skip
        sftp = client.open_sftp()
        for name in sorted(sftp.listdir(str(dirs[h]))):
            sftp.get(f"{dirs[h]}/{name}", str(out / h / name))
        client.close()


def sources_override(env, dirs) -> str:
    items = []
    for h in HOSTS:
        items.append(
            f"{{name: {h}, address: '{env[f'EF_HOST_{h}']}', port: {env['EF_HOSTS_PORT']}, "
            f"username: {env['EF_HOSTS_USER']}, remote_dir: '{dirs[h]}', "
            f"glob: 'cluster*_gpu*.pkl', key_file: '{env['EF_HOSTS_KEY']}', "
            f"known_hosts: '{env['EF_HOSTS_KNOWN_HOSTS']}'}}"
        )
    return "sync.sources=[" + ", ".join(items) + "]"


def run_embedfleet(env, dirs, out: Path, parallel_files: int, ciphers: list[str]) -> float:
    """The launch; returns the tasks' own sync seconds (the longer of the two)."""
    args = [sys.executable, str(REPO / "launch.py"), "sync", f"run.root={out}", "run.name=r",
            sources_override(env, dirs), f"sync.parallel_files={parallel_files}"]  # fmt: skip
    if ciphers:
        args.append("sync.ciphers=[" + ",".join(ciphers) + "]")
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    walls = []
    for t in range(2):
        m = json.loads((out / "r/sync/completions" / f"task_{t:05d}.json").read_text())
        assert m["counts"]["downloaded"] == 8, m["counts"]
        walls.append(m["wall_seconds"])
    return max(walls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb-per-shard", type=int, default=64)
    ap.add_argument("--parallel-files", type=int, default=4)
    ap.add_argument("--ciphers", default="", help="comma-separated, for embedfleet's sync")
    ap.add_argument("--variants", action="store_true", help="also parallel_files 1/2/8 and aes-gcm")
    ap.add_argument("--dir", default="/tmp/efsyncbench")
    a = ap.parse_args()
    env = hosts_env()
    dirs = make_shards(env, a.mb_per_shard)
    total = 16 * (a.mb_per_shard << 20)
    base = Path(a.dir)
    ciphers = [c for c in a.ciphers.split(",") if c]

    def fresh(name: str) -> Path:
        d = base / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    for d in dirs.values():  # warm the page cache of the remote files for every method
        for f in d.iterdir():
            with open(f, "rb") as fh:
                while fh.read(8 << 20):
                    pass
    rows = []
    rows.append(("scp (2 hosts at once)", timed(lambda: run_scp(env, dirs, fresh("scp"))), None))
    shutil.rmtree(base / "scp")
    rows.append(("seed: sequential paramiko sftp.get", timed(lambda: run_seed(env, dirs, fresh("seed"))), None))  # fmt: skip
    shutil.rmtree(base / "seed")
    configs = [(a.parallel_files, ciphers)]
    if a.variants:
        configs += [(1, []), (2, []), (8, []), (a.parallel_files, ["aes128-gcm@openssh.com"])]
    for pf, ci in configs:
        out = fresh(f"ef-{pf}")
        t0 = time.perf_counter()
        inner = run_embedfleet(env, dirs, out, pf, ci)
        wall = time.perf_counter() - t0
        label = f"embedfleet sync, parallel_files={pf}" + (f", {','.join(ci)}" if ci else "")
        rows.append((label + " (launch.py)", wall, inner))
        shutil.rmtree(out)
    seed_s = rows[1][1]
    scp_s = rows[0][1]
    print(f"\n{machine()}; load avg {os.getloadavg()[0]:.1f}")
    print(f"16 shards, {total / 1e6:.0f} MB, from 2 loopback sshd hosts\n")
    print(f"{'method':<62} {'wall s':>7} {'MB/s':>7} {'vs seed':>8} {'vs scp':>7}")
    results = []
    for label, wall, inner in rows:
        for what, s in ((label, wall), ("  the sync tasks themselves", inner)):
            if s is None:
                continue
            print(
                f"{what:<62} {s:7.1f} {total / 1e6 / s:7.1f} {seed_s / s:7.2f}x {scp_s / s:6.2f}x"
            )
            results.append({"method": what.strip(), "seconds": s, "mb_per_s": total / 1e6 / s})
    save("sync_bench", {"machine": machine(), "bytes": total, "results": results,
                        "command": shlex.join([sys.executable, *sys.argv])})  # fmt: skip


if __name__ == "__main__":
    main()
