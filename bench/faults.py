"""Fault campaign: kill -9 a task or the launcher at random moments of the curation
pipeline (embed -> merge -> kmeans -> curate -> metrics), rerun after each kill, and
compare the sha256 of every final output with an uninterrupted run.

    .venv/bin/python -m bench.faults [--seed 0] [--kills 20] [--out FILE] [--root DIR]

One uninterrupted reference run first (its attempt records give each task's duration).
Then one faulted run dir, killed again and again: kill point i names a stage (the points
are spread evenly over the plan's stages, in plan order), a target (a task, or the
launcher: its tasks run on as orphans and the next launch must adopt them), a task of
that stage and a moment (a random fraction of that task's reference duration after it
starts, or the moment it ends if that is sooner). Each point relaunches the same command,
waits for the task to run, kills at the moment, and waits for the launcher to exit (a
killed launcher: not at all, the next launch starts at once). When the run has got past
a point's target (a kill that landed late, an orphan that finished its stage), a last
launch completes it and the campaign goes on in a new run dir seeded with the
reference's stages before that target.

Checked at each quiet moment (no process of the run alive) and at the end: no orphan
process (none has the run dir in its environment), no marker without its data (every
output a marker names exists with its size and sha256), every output under a marker
identical to the reference's; at the end also no stale temporary (``*.tmp-*``) and every
final output identical. JSON summaries are compared without their timing fields and with
the run dir's path and name replaced (they record both).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import REPO, RESULTS, machine

# A small, fast curation pipeline (the slice tests/e2e/test_curation.py uses) with the
# metrics stages: 7 stages, 2 embed tasks, ~45 s uninterrupted on a 2-core VM.
CONFIG = [
    "+experiment=curation",
    "stages=[embed,merge,kmeans,curate,metrics]",
    "dataset.limit=120",
    "embed.num_shards=2",
    "embed.torch_threads=1",
    "model.max_length=96",
    "merge.by_source=false",
    "kmeans.n_clusters=[12,4]",
    "kmeans.n_resampling_steps=[3,1]",
    "kmeans.sample_size=[5,2]",
    "kmeans.n_iters=20",
    "curate.target_size=40",
]
# Bookkeeping, not outputs: logs, attempt records and task locks, markers (they hold
# times and hosts), the config and plan (they hold the run dir).
BOOKKEEPING_DIRS = {"logs", "attempts", "completions", ".cache"}
BOOKKEEPING_FILES = {"run.yaml", "plan.json", "launcher.lock", "launch.log"}
VOLATILE_KEYS = {
    "seconds",
    "timings_s",
    "wall_seconds",
    "finished_at",
    # a marker's resource usage (checkpoint markers such as embed parts are compared)
    "peak_rss_bytes",
    "peak_rss_children_bytes",
    "peak_cuda_bytes",
    "cpu_seconds",
}
TMP_MARK = ".tmp-"
# A launch of the small pipeline takes ~45 s on a quiet 2-core VM; much more on a busy one.
LAUNCH_TIMEOUT_S = 1800
_STARTED: list[subprocess.Popen] = []  # every launcher started, stopped at the end


def launch_cmd(run: Path, extra: list[str] = ()) -> list[str]:
    return [
        sys.executable,
        str(REPO / "launch.py"),
        *CONFIG,
        *extra,
        f"run.root={run.parent}",
        f"run.name={run.name}",
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def start(run: Path, log: Path, extra: list[str] = ()) -> subprocess.Popen:
    """Start the launcher of ``run`` (output to ``log``), in a session of its own."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            launch_cmd(run, extra),
            cwd=REPO,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _STARTED.append(proc)
    return proc


def stop_everything(*runs: Path) -> None:
    """Kill what a campaign cut short (a timeout, an error) left: launchers and tasks."""
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for run in runs:
        for pid in run_processes(run):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- what a run dir holds ------------------------------------------------------------------


def _normalized_json(data: bytes, run: Path) -> bytes:
    # Any run dir of the campaign (a segment starts from copies of the reference's files).
    under_root = re.compile(re.escape(str(run.parent)) + r"/[^/\"]+")
    names = {run.name, "reference"}

    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        if isinstance(obj, str):
            return "RUN" if obj in names else under_root.sub("RUN", obj)
        return obj

    return json.dumps(clean(json.loads(data)), sort_keys=True).encode()


def digest(path: Path, run: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json":
        data = _normalized_json(data, run)
    return hashlib.sha256(data).hexdigest()


def final_outputs(run: Path) -> dict[str, str]:
    """Every output file of the run dir (not its bookkeeping) -> its sha256."""
    out = {}
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run)
        if not p.is_file() or TMP_MARK in p.name:
            continue
        if rel.as_posix() in BOOKKEEPING_FILES or BOOKKEEPING_DIRS & set(rel.parts[:-1]):
            continue
        out[rel.as_posix()] = digest(p, run)
    return out


def stale_temporaries(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob(f"*{TMP_MARK}*"))


def markers(run: Path) -> list[Path]:
    """Task and checkpoint markers: ``completions/task_*.json`` and embed part markers."""
    found = [p for p in run.rglob("completions/task_*.json") if "invalid" not in p.parts]
    found += list(run.glob("embed/parts/*/part_*.json"))
    return sorted(found)


def marker_problems(run: Path, reference: dict[str, str] | None) -> tuple[list[str], list[str]]:
    """(markers naming an output that is missing or has another size/sha256, outputs
    under a marker that differ from ``reference``)."""
    broken, different = [], []
    for m in markers(run):
        try:
            outputs = json.loads(m.read_bytes()).get("outputs", [])
        except ValueError:
            broken.append(f"{m.relative_to(run)}: unreadable")
            continue
        for o in outputs:
            name = o.get("name") or o.get("path")
            p = run / name
            if not p.is_file():
                broken.append(f"{m.relative_to(run)}: {name} missing")
                continue
            if o.get("bytes") is not None and p.stat().st_size != o["bytes"]:
                broken.append(f"{m.relative_to(run)}: {name} has another size")
                continue
            raw = hashlib.sha256(p.read_bytes()).hexdigest()
            if o.get("sha256") and raw != o["sha256"]:
                broken.append(f"{m.relative_to(run)}: {name} has another sha256")
                continue
            if reference is not None and name in reference and digest(p, run) != reference[name]:
                different.append(name)
    return broken, sorted(set(different))


def run_processes(run: Path) -> list[int]:
    """Pids of live processes that belong to ``run`` (its dir in their environment)."""
    needle = f"EMBEDFLEET_RUN_DIR={run}\0".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes():
                stat = (d / "stat").read_text()
                if stat[stat.rfind(")") + 2] not in "ZX":
                    pids.append(int(d.name))
        except OSError:
            continue
    return sorted(pids)


def wait_quiet(run: Path, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while run_processes(run) and time.time() < deadline:
        time.sleep(0.2)


# -- the plan of a campaign ----------------------------------------------------------------


def read_plan(run: Path) -> list[dict]:
    return json.loads((run / "plan.json").read_text())["stages"]


def attempt(run: Path, stage: dict, task: int) -> dict | None:
    p = run / stage["stage_dir"] / "attempts" / f"task_{task:05d}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def has_marker(run: Path, stage: dict, task: int) -> bool:
    return (run / stage["stage_dir"] / "completions" / f"task_{task:05d}.json").exists()


def durations(run: Path) -> dict[tuple[str, int], float]:
    """(stage, task) -> seconds from start to end in the reference run."""
    out = {}
    for st in read_plan(run):
        for t in range(st["num_tasks"]):
            rec = attempt(run, st, t) or {}
            if rec.get("ended") and rec.get("started"):
                out[(st["name"], t)] = float(rec["ended"]) - float(rec["started"])
    return out


@dataclass
class KillPoint:
    index: int
    stage: str
    target: str  # "task" or "launcher"
    task: int
    fraction: float  # of the task's reference duration, after it starts
    rank: int = 0
    # what happened
    run: str = ""  # the faulted run dir (a new one when a run got past the next target)
    killed: str = ""
    landed_in: str = ""
    launch_exit: int | None = None
    adopted: int = 0  # "adopting pid" lines in the launch after this kill
    orphans: list[int] = field(default_factory=list)
    broken_markers: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)
    checked: bool = False

    @property
    def landed(self) -> bool:
        return self.killed.startswith(("task", "launcher"))

    @property
    def ok(self) -> bool:
        problems = self.orphans or self.broken_markers or self.different
        return self.landed and self.checked and not problems


def plan_kills(stages: list[dict], kills: int, seed: int) -> list[KillPoint]:
    """``kills`` points spread evenly over the stages in plan order, half at tasks and
    half at the launcher (shuffled), each at a random task, rank and moment."""
    rng = np.random.default_rng(seed)
    n = len(stages)
    targets = (["task", "launcher"] * (kills // 2 + 1))[:kills]
    rng.shuffle(targets)
    points = []
    for i in range(kills):
        st = stages[min(n - 1, (i * n) // kills)]
        world = st.get("world_size", 1) if st.get("kind") == "distributed" else 1
        points.append(
            KillPoint(
                index=i,
                stage=st["name"],
                target=targets[i],
                task=int(rng.integers(st["num_tasks"])),
                fraction=float(rng.uniform(0.0, 0.9)),
                rank=int(rng.integers(world)),
            )
        )
    return points


# -- running it ----------------------------------------------------------------------------


def _live_attempt(run: Path, stage: dict, task: int, launcher: int) -> dict | None:
    rec = attempt(run, stage, task)
    if not rec or rec.get("ended"):
        return None
    if launcher not in (rec.get("launcher_pid"), rec.get("adopted_by")):
        return None
    return rec


def _running_task(run: Path, stages: list[dict], launcher: int) -> tuple[str, dict] | None:
    for st in stages:
        for t in range(st["num_tasks"]):
            rec = _live_attempt(run, st, t, launcher)
            if rec:
                return f"{st['name']} {t}", rec
    return None


def _kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def _running_from(run: Path, stages: list[dict], first: int, launcher: int):
    """(stage, task, attempt) of a task ``launcher`` runs in ``stages[first:]``, or None."""
    for st in stages[first:]:
        for t in range(st["num_tasks"]):
            rec = _live_attempt(run, st, t, launcher)
            if rec:
                return st, t, rec
    return None


def execute(
    point: KillPoint, run: Path, stages: list[dict], spans: dict[tuple[str, int], float], log: Path
) -> None:
    """Relaunch ``run``, kill at ``point``'s moment, wait as the point says. A target that
    gets done before this launcher runs it (an orphan it adopted, or that finished just
    before) passes the point on to the next task this launcher runs."""
    by_name = {s["name"]: s for s in stages}
    order = [s["name"] for s in stages]
    stage = by_name[point.stage]
    with open(log, "ab") as fh:
        fh.write(f"\n##### kill point {point.index}: {asdict(point)}\n".encode())
    proc = start(run, log)
    deadline = time.time() + LAUNCH_TIMEOUT_S
    rec = None
    while proc.poll() is None and time.time() < deadline:
        rec = _live_attempt(run, stage, point.task, proc.pid)
        if rec:
            break
        if has_marker(run, stage, point.task):
            found = _running_from(run, stages, order.index(stage["name"]), proc.pid)
            if found:
                stage, point.task, rec = found
                point.stage = stage["name"]
                break
        time.sleep(0.02)
    if rec is None:
        point.killed = "nothing (the launcher ended before the task ran)"
        proc.wait()
        point.launch_exit = proc.returncode
        return
    moment = time.time() + point.fraction * spans.get((point.stage, point.task), 5.0)
    # The moment comes from the reference's durations; on a machine busier or quieter
    # than during the reference the target may end first. Then the launcher is killed at
    # once (a kill between two tasks is a fault moment too), rather than missing the point
    # when the launcher exits before the moment (the last stage).
    while time.time() < moment and proc.poll() is None:
        if _live_attempt(run, stage, point.task, proc.pid) is None:
            break
        time.sleep(0.02)
    victim = None
    if point.target == "task":
        live = _live_attempt(run, stage, point.task, proc.pid)
        if live:
            pids = live["pids"]
            victim = pids[min(point.rank, len(pids) - 1)]
            where = f"{point.stage} {point.task}"
            if _kill(victim):
                point.killed = f"task {where} pid {victim}"
                point.landed_in = point.stage
            else:
                victim = None
        if victim is None:  # it finished before the moment: the launcher takes the hit
            point.target = "launcher"
    if point.target == "launcher":
        running = _running_task(run, stages, proc.pid)
        point.landed_in = running[0] if running else "between stages"
        if _kill(proc.pid):
            point.killed = f"launcher pid {proc.pid}"
        else:
            point.killed = "nothing (the launcher had ended)"
    proc.wait(timeout=LAUNCH_TIMEOUT_S)
    point.launch_exit = proc.returncode


def check(point: KillPoint, run: Path, reference: dict[str, str]) -> None:
    wait_quiet(run)
    point.orphans = run_processes(run)
    point.broken_markers, point.different = marker_problems(run, reference)
    point.checked = True


def adoptions(log: Path, since: int) -> int:
    return log.read_bytes()[since:].count(b"from an earlier launcher")


def run_campaign(root: Path, *, seed: int, kills: int, out: Path | None = None) -> dict:
    """Run the campaign under ``root``; return (and write to ``out``) its result."""
    try:
        return _campaign(root, seed=seed, kills=kills, out=out)
    finally:
        stop_everything(root / "reference", root / "faulted")


def seed_run(ref_run: Path, run: Path, stages: list[dict], first: str) -> None:
    """A fresh run dir holding the reference's finished stages before ``first`` (outputs
    and markers; not attempts or logs), so that a segment starts where its kills are."""
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    for st in stages:
        if st["name"] == first:
            break
        shutil.copytree(
            ref_run / st["stage_dir"],
            run / st["stage_dir"],
            ignore=shutil.ignore_patterns("attempts", "logs"),
            dirs_exist_ok=True,
        )


def finish_segment(
    run: Path, log: Path, pending: list[KillPoint], reference: dict[str, str]
) -> dict:
    """Launch ``run`` to completion, check the points still pending and the run dir."""
    offset = log.stat().st_size if log.exists() else 0
    final = start(run, log)
    final_exit = final.wait(timeout=LAUNCH_TIMEOUT_S)
    for p in pending:
        p.adopted = adoptions(log, offset)
        check(p, run, reference)
    wait_quiet(run)
    outputs = final_outputs(run)
    differing = sorted(
        k for k in set(reference) | set(outputs) if reference.get(k) != outputs.get(k)
    )
    broken, _ = marker_problems(run, None)
    segment = {
        "run": run.name,
        "final_exit": final_exit,
        "outputs_differing": differing,
        "stale_temporaries": stale_temporaries(run),
        "orphans": run_processes(run),
        "markers_without_data": broken,
    }
    segment["passed"] = (
        final_exit == 0
        and not any(segment[k] for k in ("outputs_differing", "stale_temporaries", "orphans"))
        and not broken
    )
    return segment


def _campaign(root: Path, *, seed: int, kills: int, out: Path | None) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    ref_run = root / "reference"
    for d in root.iterdir():
        if d.is_dir() and (d == ref_run or d.name.startswith("faulted")):
            shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    ref_log = root / "reference.log"
    ref_log.unlink(missing_ok=True)
    proc = start(ref_run, ref_log)
    if proc.wait(timeout=LAUNCH_TIMEOUT_S) != 0:
        raise RuntimeError(f"the reference run failed; see {ref_log}")
    reference = final_outputs(ref_run)
    ref_seconds = time.time() - t0
    stages = read_plan(ref_run)
    by_name = {st["name"]: st for st in stages}
    spans = durations(ref_run)
    points = plan_kills(stages, kills, seed)
    log = root / "faulted.log"
    log.unlink(missing_ok=True)
    segments: list[dict] = []
    run: Path | None = None
    pending: list[KillPoint] = []  # killed, not yet checked at a quiet moment
    for point in points:
        target = by_name[point.stage]
        if run is not None and has_marker(run, target, point.task):
            # That task is done: another unfinished task of the stage, if there is one.
            left = [t for t in range(target["num_tasks"]) if not has_marker(run, target, t)]
            point.task = left[0] if left else point.task
        if run is None or has_marker(run, target, point.task):
            # The run is past this point's target: finish it, go on in a new run dir.
            if run is not None:
                segments.append(finish_segment(run, log, pending, reference))
                pending = []
            run = root / f"faulted-{len(segments)}"
            seed_run(ref_run, run, stages, point.stage)
        point.run = run.name
        offset = log.stat().st_size if log.exists() else 0
        execute(point, run, stages, spans, log)
        for p in pending:
            p.adopted = adoptions(log, offset)
        if point.target == "launcher" and point.killed.startswith("launcher"):
            pending.append(point)  # its orphans run on: checked after the next launch
            continue
        for p in [*pending, point]:
            check(p, run, reference)
        pending = []
        if out is not None:  # so far, for a campaign cut short
            progress = {"seed": seed, "kills": kills, "finished": False}
            progress["points"] = [{**asdict(p), "ok": p.ok} for p in points]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(progress, indent=2))
    assert run is not None
    segments.append(finish_segment(run, log, pending, reference))
    result = {
        "seed": seed,
        "kills": kills,
        "finished": True,
        "command": shlex.join(launch_cmd(Path("RUN_ROOT/RUN_NAME"))),
        "machine": machine(),
        "reference_seconds": round(ref_seconds, 1),
        "campaign_seconds": round(time.time() - t0, 1),
        "outputs_compared": len(reference),
        "segments": segments,
        "final_exit": max(abs(sg["final_exit"]) for sg in segments),
        "outputs_differing": [
            f"{sg['run']}/{k}" for sg in segments for k in sg["outputs_differing"]
        ],
        "stale_temporaries": [
            f"{sg['run']}/{k}" for sg in segments for k in sg["stale_temporaries"]
        ],
        "orphans": [pid for sg in segments for pid in sg["orphans"]],
        "markers_without_data": [m for sg in segments for m in sg["markers_without_data"]],
        "points": [{**asdict(p), "landed": p.landed, "ok": p.ok} for p in points],
    }
    result["identical_points"] = sum(p.ok for p in points)
    result["passed"] = all(sg["passed"] for sg in segments) and result["identical_points"] == kills
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result


def table(result: dict) -> str:
    rows = [
        f"{'#':>2}  {'run':<10} {'aimed at':<26} {'killed':<30} {'landed in':<18} {'exit':>4} "
        f"{'adopt':>5}  verdict"
    ]
    for p in result["points"]:
        aimed = f"{p['target']} {p['stage']} {p['task']}"
        bad = []
        if p["orphans"]:
            bad.append(f"orphans {p['orphans']}")
        if p["broken_markers"]:
            bad.append(f"{len(p['broken_markers'])} marker(s) without data")
        if p["different"]:
            bad.append(f"{len(p['different'])} output(s) differ")
        if not p["landed"]:
            bad.append("no kill landed")
        verdict = "identical" if p["ok"] else ("; ".join(bad) or "not checked")
        exit_code = "" if p["launch_exit"] is None else str(p["launch_exit"])
        rows.append(
            f"{p['index']:>2}  {p['run']:<10} {aimed:<26} {p['killed'][:30]:<30} "
            f"{p['landed_in'][:18]:<18} {exit_code:>4} {p['adopted']:>5}  {verdict}"
        )
    rows.append(
        f"\n{result['identical_points']} of {result['kills']} kill points identical; "
        f"{len(result['segments'])} faulted run dir(s), each completed by a last launch "
        f"(worst exit {result['final_exit']}); {result['outputs_compared']} outputs compared "
        "in each, "
        f"{len(result['outputs_differing'])} differ; stale temporaries: "
        f"{len(result['stale_temporaries'])}; orphans: {len(result['orphans'])}; markers "
        f"without data: {len(result['markers_without_data'])} -> "
        f"{'PASS' if result['passed'] else 'FAIL'} ({result['campaign_seconds']:.0f} s)"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kills", type=int, default=20, help="kill points (default 20)")
    ap.add_argument("--out", type=Path, default=RESULTS / "faults.json", help="JSON result")
    ap.add_argument("--root", type=Path, default=None, help="work dir (default: a temp dir)")
    args = ap.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="embedfleet-faults-"))
    result = run_campaign(root, seed=args.seed, kills=args.kills, out=args.out)
    print(table(result))
    print(f"result: {args.out}; run dirs and launcher logs: {root}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
