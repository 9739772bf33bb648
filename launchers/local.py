"""Run a plan's tasks as processes on this machine.

Stages run in plan order; a stage's pending tasks run ``cluster.parallelism`` at a time
(``cluster.num_gpus`` > 0: one per GPU with CUDA_VISIBLE_DEVICES set). A distributed stage
starts ``world_size`` processes with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT. Each task's
output goes to its log file and is echoed to the console with a ``[stage task]`` prefix
(on an object-store run dir the log is kept locally while the task runs and published
when it ends). A failed task does not stop its siblings, but no later stage starts.
Each task runs in its own process group, reaped when it ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from launchers.base import (
    FAILED,
    PENDING,
    RUNNING,
    Launcher,
    LaunchResult,
    SchedulerView,
    read_attempt,
    write_attempt,
)
from lib.core.paths import RunPaths
from lib.core.repo import REPO_ROOT
from lib.core.sharding import compress_indices
from lib.plan.spec import DISTRIBUTED, Plan, StageSpec, completed_tasks
from lib.runtime.cores import ENV_CPU_CORES, usable_cores
from lib.runtime.identity import TaskIdentity, identity_env

_LABELLED = re.compile(r"^\d\d:\d\d:\d\d \w+ \[")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class _Running:
    task: int
    procs: list[subprocess.Popen]
    threads: list[threading.Thread]
    slot: int
    started: float


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _reap(pgid: int) -> None:
    """Kill whatever the task left behind in its process group once the task has exited
    (a SIGKILLed task cannot stop its children itself; they would keep memory and cores)."""
    _signal_group(pgid, signal.SIGKILL)


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, cfg, *, echo: bool = True) -> None:
        super().__init__(cfg)
        c = cfg.cluster
        self.num_gpus = int(c.num_gpus)
        self.parallelism = self.num_gpus if self.num_gpus > 0 else max(1, int(c.parallelism))
        self.extra_env = {str(k): str(v) for k, v in (c.env or {}).items()}
        self.echo = echo
        self._print_lock = threading.Lock()

    # -- process plumbing ---------------------------------------------------------------

    def _env(self, identity: TaskIdentity, threads: int, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(identity_env(identity, self.name))
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        # Share the cores between concurrent tasks instead of oversubscribing them.
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
            env.setdefault(key, str(threads))
        if self.num_gpus > 0:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        elif identity.world_size == 1 and ENV_CPU_CORES not in env:
            # Concurrent tasks get disjoint cores: backends that pin threads (vLLM's CPU
            # build) bind to these instead of all piling onto the same ones.
            cores = usable_cores()
            first = (slot * threads) % len(cores)
            env[ENV_CPU_CORES] = ",".join(map(str, cores[first : first + threads]))
        return env

    def _pump(self, proc: subprocess.Popen, log_file: Path, prefix: str) -> None:
        with open(log_file, "ab") as fh:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                fh.write(line)
                fh.flush()
                if self.echo:
                    text = line.decode(errors="replace").rstrip("\r\n")
                    # tqdm redraws with \r; show only the last state of such a line.
                    text = text.rsplit("\r", 1)[-1]
                    # Job log lines carry their own "[stage task]" label; others get ours.
                    shown = text if _LABELLED.match(text) else f"{prefix} {text}"
                    with self._print_lock:
                        print(shown, flush=True)

    def _start(self, paths: RunPaths, spec: StageSpec, task: int, slot: int) -> _Running:
        cores = len(usable_cores())
        world = spec.world_size if spec.kind == DISTRIBUTED else 1
        concurrent = world if spec.kind == DISTRIBUTED else min(self.parallelism, spec.num_tasks)
        threads = max(1, cores // max(1, concurrent))
        cmd = spec.command(sys.executable, paths.root)
        port = _free_port()
        procs, pumps = [], []
        for rank in range(world):
            identity = TaskIdentity(paths.root, spec.name, task, spec.num_tasks, rank, world)
            env = self._env(identity, threads, slot)
            if world > 1:  # RANK/WORLD_SIZE come with the identity; the rendezvous here
                env.update(LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            logf = paths.storage.local_file(spec.log(task, rank))
            logf.parent.mkdir(parents=True, exist_ok=True)
            with open(logf, "ab") as fh:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                fh.write(f"=== {stamp} local attempt: {shlex.join(cmd)}\n".encode())
            # Its own process group, so that what the task started (vLLM's engine and
            # worker processes, a DataLoader's workers) goes with it when it ends, as a
            # SLURM job step's cgroup would: see _reap.
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
            prefix = f"[{spec.name} {task}]" if world == 1 else f"[{spec.name} r{rank}]"
            t = threading.Thread(target=self._pump, args=(proc, logf, prefix), daemon=True)
            t.start()
            procs.append(proc)
            pumps.append(t)
        write_attempt(
            paths,
            spec,
            task,
            launcher=self.name,
            host=socket.gethostname(),
            pids=[p.pid for p in procs],
            started=time.time(),
            ended=None,
            returncode=None,
            command=shlex.join(cmd),
        )
        return _Running(task, procs, pumps, slot, time.time())

    def _finish(self, paths: RunPaths, spec: StageSpec, r: _Running) -> int:
        codes = [p.wait() for p in r.procs]
        for p in r.procs:
            _reap(p.pid)
        for t in r.threads:
            t.join(timeout=10)
        for rank in range(len(r.procs)):
            paths.storage.publish_log(spec.log(r.task, rank))
        # A distributed task fails if any rank failed; report the first bad code.
        code = next((c for c in codes if c != 0), 0)
        write_attempt(paths, spec, r.task, ended=time.time(), returncode=code)
        return code

    # -- the stage loop -----------------------------------------------------------------

    def _run_stage(self, paths: RunPaths, spec: StageSpec, pending: list[int]) -> list[int]:
        """Run ``pending`` tasks; return the failed ones."""
        slots = list(range(self.parallelism if spec.kind != DISTRIBUTED else 1))
        queue = list(pending)
        running: list[_Running] = []
        failed: list[int] = []
        try:
            while queue or running:
                while queue and slots:
                    running.append(self._start(paths, spec, queue.pop(0), slots.pop(0)))
                time.sleep(0.2)
                for r in list(running):
                    codes = [p.poll() for p in r.procs]
                    if any(c not in (None, 0) for c in codes):
                        for p in r.procs:  # one rank died: stop its peers
                            if p.poll() is None:
                                _signal_group(p.pid, signal.SIGTERM)
                    elif any(c is None for c in codes):
                        continue
                    code = self._finish(paths, spec, r)
                    running.remove(r)
                    slots.append(r.slot)
                    if code != 0:
                        failed.append(r.task)
                        self._say(
                            f"[{spec.name} {r.task}] FAILED ({_describe_exit(code)}); log: "
                            f"{paths.url(spec.log(r.task))}"
                        )
        except KeyboardInterrupt:
            # The tasks are in their own sessions, so the terminal's Ctrl-C reached only us.
            for r in running:
                for p in r.procs:
                    _signal_group(p.pid, signal.SIGTERM)
                self._finish(paths, spec, r)
            raise
        return sorted(failed)

    def _say(self, text: str) -> None:
        with self._print_lock:
            print(text, flush=True)

    def launch(self, paths: RunPaths, plan: Plan, *, dry_run: bool = False) -> LaunchResult:
        failed: dict[str, list[int]] = {}
        for spec in plan.stages:
            done = completed_tasks(paths, spec)
            pending = [t for t in range(spec.num_tasks) if t not in done]
            if not pending:
                self._say(f"{spec.name}: all {spec.num_tasks} task(s) already complete")
                continue
            if dry_run:
                cmd = shlex.join(spec.command(sys.executable, paths.root))
                self._say(
                    f"{spec.name}: would run tasks {compress_indices(pending)} of "
                    f"{spec.num_tasks}: {cmd}"
                )
                continue
            if done:
                self._say(
                    f"{spec.name}: resuming: {len(done)} of {spec.num_tasks} task(s) complete, "
                    f"running {compress_indices(pending)}"
                )
            else:
                self._say(f"{spec.name}: running {spec.num_tasks} task(s)")
            t0 = time.time()
            bad = self._run_stage(paths, spec, pending)
            if bad:
                failed[spec.name] = bad
                return LaunchResult(False, False, failed)
            self._say(f"{spec.name}: done in {time.time() - t0:.1f}s")
        return LaunchResult(not dry_run, False, failed)

    def cancel(self, paths: RunPaths, plan: Plan) -> int:
        count = 0
        for spec in plan.stages:
            for task in range(spec.num_tasks):
                rec = read_attempt(paths, spec, task)
                if not rec or rec.get("ended") or rec.get("host") != socket.gethostname():
                    continue
                for pid in rec.get("pids", []):
                    try:
                        os.killpg(pid, signal.SIGTERM)  # the task and what it started
                        count += 1
                    except (ProcessLookupError, PermissionError):
                        try:
                            os.kill(pid, signal.SIGTERM)
                            count += 1
                        except ProcessLookupError:
                            pass
        return count

    def scheduler_view(self, paths: RunPaths, plan: Plan) -> SchedulerView:
        """From the attempt records: running while a pid lives on this host, failed with
        its exit code, pending if it exited 0 without a marker."""
        view: SchedulerView = {}
        for spec in plan.stages:
            for task in range(spec.num_tasks):
                rec = read_attempt(paths, spec, task)
                if rec is not None:
                    view[(spec.name, task)] = attempt_state(rec)
        return view


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def attempt_state(rec: dict) -> tuple[str, str]:
    """State from a local attempt record: running if a pid lives on this host."""
    if rec.get("ended"):
        code = rec.get("returncode")
        return (FAILED, f"exit code {code}") if code else (PENDING, "exited 0 without marker")
    if rec.get("host") == socket.gethostname() and any(_pid_alive(p) for p in rec.get("pids", [])):
        return RUNNING, f"pid {rec['pids'][0]}"
    return FAILED, "process vanished without a marker"
