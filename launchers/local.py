"""Run a plan's tasks as processes on this machine.

Stages run in plan order; a stage's pending tasks run ``cluster.parallelism`` at a time
(``cluster.num_gpus`` > 0: one per GPU, or per ``embed.vllm.tensor_parallel_size`` GPUs, with
CUDA_VISIBLE_DEVICES set; ``lib.compute.devices.local_device_env``). A distributed stage
starts ``world_size`` processes with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT. A task
writes its output straight into its log file, so it keeps its log if the launcher dies;
the launcher tails the file and echoes it to the console with a ``[stage task]`` prefix
(on an object-store run dir the log is kept locally while the task runs and published
when it ends). A failed task does not stop its siblings, but no later stage starts. Each
task runs in its own process group, reaped when it ends.

A task still running from an earlier launcher of this run (one killed with kill -9: its
tasks run on) is adopted, not started twice: its attempt record names its pids and when
each process started (so that a reused pid is not mistaken for it); the launcher waits
for it to exit and takes its marker as the outcome.

Ctrl-C (SIGINT; SIGTERM and SIGHUP alike) signals every running task at once, waits for
them with one deadline (``STOP_GRACE_S``), then, or at a second Ctrl-C, SIGKILLs each
task's process group; further signals are ignored until no child is left. It prints one
line and ``launch`` returns with ``interrupted`` set (exit code 130).
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from launchers.base import (
    FAILED,
    PENDING,
    RUNNING,
    Launcher,
    LaunchResult,
    SchedulerView,
    read_attempt,
    stop_signals_to,
    write_attempt,
)
from lib.compute.devices import describe_local_gpus, local_device_env, stage_uses_gpus
from lib.config.redact import env_file_values, task_env
from lib.core.locks import process_alive, process_start
from lib.core.markers import check_marker
from lib.core.paths import RunPaths
from lib.core.repo import REPO_ROOT
from lib.core.sharding import compress_indices
from lib.embed.params import gpus_per_task
from lib.plan.spec import DISTRIBUTED, Plan, StageSpec, completed_tasks
from lib.runtime.cores import ENV_CPU_CORES, usable_cores
from lib.runtime.identity import TaskIdentity, identity_env

_LABELLED = re.compile(r"^\d\d:\d\d:\d\d \w+ \[")

# After Ctrl-C: how long tasks get to exit on SIGTERM before their process groups are
# SIGKILLed. A task of this launcher stops at once on SIGTERM (lib.runtime.job); this
# only bounds one stuck in C code (a model forward, a collective).
STOP_GRACE_S = 10.0
# The signals that stop the launcher (and its tasks) cleanly.
POLL_S = 0.2


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


class _Tail(threading.Thread):
    """Echoes the lines a task appends to its log file, from ``offset`` on, until told
    the task has ended (then drains what is left)."""

    def __init__(self, launcher: LocalLauncher, path: Path, offset: int, prefix: str) -> None:
        super().__init__(daemon=True)
        self.launcher, self.path, self.offset, self.prefix = launcher, path, offset, prefix
        self.done = threading.Event()

    def run(self) -> None:
        buf = b""
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            while True:
                # Read after looking at `done`: what the task wrote before it ended is in
                # the file by the time `done` is set, so this read still gets it.
                finished = self.done.is_set()
                chunk = fh.read(1 << 16)
                if chunk:
                    *lines, buf = (buf + chunk).split(b"\n")
                    for line in lines:
                        self.launcher._echo(line, self.prefix)
                elif finished:
                    if buf:
                        self.launcher._echo(buf, self.prefix)
                    return
                else:
                    time.sleep(0.1)


@dataclass
class _Running:
    task: int
    pids: list[int]
    starts: list[str | None]  # each pid's process_start: a reused pid is not the task
    procs: list[subprocess.Popen]  # empty for a task adopted from an earlier launcher
    tails: list[_Tail]
    slot: int
    started: float = field(default_factory=time.time)

    @property
    def adopted(self) -> bool:
        return not self.procs

    def codes(self) -> list[int | None]:
        """Each process's exit code, None while it runs (an adopted process that ended
        reads 0: its marker decides, see ``LocalLauncher._finish``)."""
        if self.procs:
            return [p.poll() for p in self.procs]
        return [
            None if process_alive(p, s) else 0 for p, s in zip(self.pids, self.starts, strict=True)
        ]

    def alive(self) -> bool:
        return any(c is None for c in self.codes())

    def signal(self, sig: int) -> None:
        for pid in self.pids:
            _signal_group(pid, sig)


class _Interrupted(Exception):
    """Raised out of the stage loop once every task is stopped after Ctrl-C."""

    def __init__(self, stopped: int) -> None:
        super().__init__(f"{stopped} task(s) stopped")
        self.stopped = stopped


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _reap(pgid: int) -> None:
    """Kill whatever the task left behind in its process group once the task has exited
    (a SIGKILLed task cannot stop its children itself; they would keep memory and cores)."""
    _signal_group(pgid, signal.SIGKILL)


def live_pids(rec: dict) -> list[tuple[int, str | None]]:
    """The (pid, process_start) pairs of a local attempt record that still run here as
    the processes it started; none for a record of another host or an ended attempt."""
    if rec.get("ended") or rec.get("host") != socket.gethostname():
        return []
    pids = [int(p) for p in rec.get("pids", [])]
    starts = list(rec.get("process_starts") or [])
    if len(starts) != len(pids):
        return []  # no way to tell the task from a process that got its pid later
    return [(p, s) for p, s in zip(pids, starts, strict=True) if process_alive(p, s)]


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, cfg, *, echo: bool = True) -> None:
        super().__init__(cfg)
        c = cfg.cluster
        self.num_gpus = int(c.num_gpus)
        # GPUs of one sharded task (vLLM tensor parallel) and whether ranks may share one.
        embed = cfg.get("embed")
        self.gpus_per_task = gpus_per_task(embed) if self.num_gpus > 0 and embed else 1
        self.share_gpus = bool(c.get("share_gpus", False))
        self.parallelism = (
            max(1, self.num_gpus // self.gpus_per_task)
            if self.num_gpus > 0
            else max(1, int(c.parallelism))
        )
        # Filled by launch (task_env): a retry's secrets come from the environment then.
        self.extra_env: dict[str, str] = {}
        self.echo = echo
        self._print_lock = threading.Lock()
        self._signals = 0  # stop signals received during `launch`
        self._quiet = False  # after Ctrl-C: task output goes to the logs only

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
        if self.num_gpus == 0 and identity.world_size == 1 and ENV_CPU_CORES not in env:
            # Concurrent tasks get disjoint cores: backends that pin threads (vLLM's CPU
            # build) bind to these instead of all piling onto the same ones.
            cores = usable_cores()
            first = (slot * threads) % len(cores)
            env[ENV_CPU_CORES] = ",".join(map(str, cores[first : first + threads]))
        return env

    def _echo(self, line: bytes, prefix: str) -> None:
        if not self.echo or self._quiet:
            return
        text = line.decode(errors="replace").rstrip("\r\n")
        # tqdm redraws with \r; show only the last state of such a line.
        text = text.rsplit("\r", 1)[-1]
        # Job log lines carry their own "[stage task]" label; others get ours.
        shown = text if _LABELLED.match(text) else f"{prefix} {text}"
        with self._print_lock:
            print(shown, flush=True)

    @staticmethod
    def _prefix(spec: StageSpec, task: int, rank: int, world: int) -> str:
        return f"[{spec.name} {task}]" if world == 1 else f"[{spec.name} r{rank}]"

    def _start(self, paths: RunPaths, spec: StageSpec, task: int, slot: int) -> _Running:
        cores = len(usable_cores())
        world = spec.world_size if spec.kind == DISTRIBUTED else 1
        concurrent = world if spec.kind == DISTRIBUTED else min(self.parallelism, spec.num_tasks)
        threads = max(1, cores // max(1, concurrent))
        cmd = spec.command(sys.executable, paths.root)
        port = _free_port()
        procs, tails = [], []
        for rank in range(world):
            identity = TaskIdentity(paths.root, spec.name, task, spec.num_tasks, rank, world)
            env = self._env(identity, threads, slot)
            # Each process its own GPUs (CUDA_VISIBLE_DEVICES) and a rank its LOCAL_RANK.
            gpus = self.num_gpus if stage_uses_gpus(self.cfg, spec.group) else 0
            env.update(
                local_device_env(
                    gpus,
                    slot=slot,
                    rank=rank,
                    world=world,
                    per_task=self.gpus_per_task,
                    share=self.share_gpus,
                    parent_visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
                )
            )
            if world > 1:  # RANK/WORLD_SIZE come with the identity; the rendezvous here
                env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            logf = paths.storage.local_file(spec.log(task, rank))
            logf.parent.mkdir(parents=True, exist_ok=True)
            with open(logf, "ab") as fh:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                fh.write(f"=== {stamp} local attempt: {shlex.join(cmd)}\n".encode())
                fh.flush()
                offset = fh.tell()
                # Its own process group, so that what the task started (vLLM's engine and
                # worker processes, a DataLoader's workers) goes with it when it ends, as a
                # SLURM job step's cgroup would: see _reap. Not the terminal's: Ctrl-C
                # reaches only the launcher, which stops the tasks itself.
                proc = subprocess.Popen(
                    cmd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    cwd=REPO_ROOT,
                    start_new_session=True,
                )
            tail = _Tail(self, logf, offset, self._prefix(spec, task, rank, world))
            tail.start()
            procs.append(proc)
            tails.append(tail)
        pids = [p.pid for p in procs]
        starts = [process_start(pid) for pid in pids]
        write_attempt(
            paths,
            spec,
            task,
            launcher=self.name,
            host=socket.gethostname(),
            launcher_pid=os.getpid(),
            pids=pids,
            process_starts=starts,
            started=time.time(),
            ended=None,
            returncode=None,
            interrupted=None,
            command=shlex.join(cmd),
        )
        return _Running(task, pids, starts, procs, tails, slot)

    def _adopt(
        self, paths: RunPaths, spec: StageSpec, task: int, slot: int, live: list
    ) -> _Running:
        """Follow a task an earlier launcher started and that still runs."""
        pids = [p for p, _ in live]
        world = len(pids)
        more = f" (and {world - 1} more rank(s))" if world > 1 else ""
        self._say(f"{spec.name} task {task}: adopting pid {pids[0]}{more} from an earlier launcher")
        tails = []
        for rank in range(world):
            logf = paths.storage.local_file(spec.log(task, rank))
            offset = logf.stat().st_size if logf.exists() else 0
            if logf.exists():
                tail = _Tail(self, logf, offset, self._prefix(spec, task, rank, world))
                tail.start()
                tails.append(tail)
        write_attempt(paths, spec, task, adopted_by=os.getpid())
        return _Running(task, pids, [s for _, s in live], [], tails, slot)

    def _finish(
        self, paths: RunPaths, spec: StageSpec, r: _Running, *, interrupted: bool = False
    ) -> int:
        if r.procs:
            codes = [p.wait() for p in r.procs]
        else:
            while r.alive():
                time.sleep(POLL_S)
            codes = [0]
        for pid in r.pids:
            _reap(pid)
        for t in r.tails:
            t.done.set()
        for t in r.tails:
            t.join(timeout=10)
        for rank in range(len(r.pids)):
            paths.storage.publish_log(spec.log(r.task, rank))
        # A distributed task fails if any rank failed; report the first bad code. An
        # adopted task's exit code went to the launcher that died: its marker tells.
        code = next((c for c in codes if c != 0), 0)
        if r.adopted and not interrupted:
            code = 0 if check_marker(paths, spec.stage_dir, r.task, spec.config_hash) else 1
        write_attempt(
            paths, spec, r.task, ended=time.time(), returncode=code, interrupted=interrupted
        )
        return code

    # -- Ctrl-C -------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals += 1  # acted on by the stage loop (never raise here: no traceback)

    @contextlib.contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        """Count stop signals instead of dying of them while tasks may run (main thread
        only: a launcher started from another thread keeps the process's handlers)."""
        self._signals = 0
        self._quiet = False
        with stop_signals_to(self._on_signal):
            yield

    def _stop_all(self, paths: RunPaths, spec: StageSpec, running: list[_Running]) -> int:
        """Stop every running task: SIGTERM to all at once, one deadline, then SIGKILL of
        each process group (at once on a second signal). Returns how many were stopped."""
        self._quiet = True
        seen = self._signals
        for r in running:
            r.signal(signal.SIGTERM)
        deadline = time.time() + STOP_GRACE_S
        killed = False
        while any(r.alive() for r in running):
            if not killed and (self._signals > seen or time.time() > deadline):
                for r in running:
                    r.signal(signal.SIGKILL)
                killed = True
            time.sleep(0.05)
        for r in running:
            self._finish(paths, spec, r, interrupted=True)
        return len(running)

    # -- the stage loop -----------------------------------------------------------------

    def _take_over(self, paths: RunPaths, spec: StageSpec, task: int) -> list | None:
        """The live processes of ``task`` from an earlier launcher, to adopt; None if
        there are none. A distributed task with only some ranks left cannot finish: those
        are killed and the task runs again."""
        rec = read_attempt(paths, spec, task)
        if not rec or rec.get("launcher_pid") == os.getpid():
            return None
        live = live_pids(rec)
        if live and len(live) < len(rec.get("pids", [])):
            for pid, _ in live:
                _signal_group(pid, signal.SIGKILL)
            while any(process_alive(p, s) for p, s in live):
                time.sleep(0.05)
            return None
        return live or None

    def _run_stage(self, paths: RunPaths, spec: StageSpec, pending: list[int]) -> list[int]:
        """Run ``pending`` tasks; return the failed ones. Raises ``_Interrupted``."""
        slots = list(range(self.parallelism if spec.kind != DISTRIBUTED else 1))
        running: list[_Running] = []
        queue: list[int] = []
        for task in pending:
            live = self._take_over(paths, spec, task)
            if live is None:
                queue.append(task)
            else:  # it holds a slot: it uses the cores one would
                slot = slots.pop(0) if slots else len(running)
                running.append(self._adopt(paths, spec, task, slot, live))
        failed: list[int] = []
        while queue or running:
            if self._signals:
                raise _Interrupted(self._stop_all(paths, spec, running))
            while queue and slots:
                running.append(self._start(paths, spec, queue.pop(0), slots.pop(0)))
            time.sleep(POLL_S)
            for r in list(running):
                codes = r.codes()
                if any(c not in (None, 0) for c in codes):
                    for p in r.procs:  # one rank died: stop its peers
                        if p.poll() is None:
                            _signal_group(p.pid, signal.SIGTERM)
                elif any(c is None for c in codes):
                    continue
                if self._signals:
                    break  # stopped with the others, as interrupted
                code = self._finish(paths, spec, r)
                running.remove(r)
                if r.slot < self.parallelism:
                    slots.append(r.slot)
                if code != 0:
                    failed.append(r.task)
                    why = (
                        "it ended without a completion marker"
                        if r.adopted
                        else _describe_exit(code)
                    )
                    self._say(
                        f"[{spec.name} {r.task}] FAILED ({why}); log: {paths.url(spec.log(r.task))}"
                    )
        return sorted(failed)

    def _say(self, text: str) -> None:
        with self._print_lock:
            print(text, flush=True)

    def launch(self, paths: RunPaths, plan: Plan, *, dry_run: bool = False) -> LaunchResult:
        with self._signals_deferred():
            try:
                return self._launch(paths, plan, dry_run)
            except _Interrupted as exc:
                self._say(
                    f"interrupted: {exc.stopped} task(s) stopped; rerun the same command to resume"
                )
                return LaunchResult(False, False, {}, interrupted=exc.stopped)

    def _launch(self, paths: RunPaths, plan: Plan, dry_run: bool) -> LaunchResult:
        failed: dict[str, list[int]] = {}
        if not dry_run:
            # Straight into the tasks' process environment: never into a file.
            tenv = task_env(self.cfg.cluster, literal_secrets=True, launcher=self.name)
            self.extra_env = {
                **(env_file_values(tenv.env_file) if tenv.env_file else {}),
                **tenv.plain,
                **tenv.secret,
            }
        gpus = describe_local_gpus(  # refuses a layout that cannot work, before any task
            self.num_gpus,
            self.gpus_per_task,
            {
                s.name: s.world_size
                for s in plan.stages
                if s.kind == DISTRIBUTED and stage_uses_gpus(self.cfg, s.group)
            },
            share=self.share_gpus,
        )
        if gpus:
            self._say(gpus)
        for spec in plan.stages:
            if self._signals:
                raise _Interrupted(0)
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
                if not rec:
                    continue
                for pid, _ in live_pids(rec):
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
        its exit code, pending if it exited 0 without a marker or was interrupted."""
        view: SchedulerView = {}
        for spec in plan.stages:
            for task in range(spec.num_tasks):
                rec = read_attempt(paths, spec, task)
                if rec is not None:
                    view[(spec.name, task)] = attempt_state(rec)
        return view


def attempt_state(rec: dict) -> tuple[str, str]:
    """State from a local attempt record: running if its processes live on this host."""
    if rec.get("ended"):
        if rec.get("interrupted"):
            return PENDING, "interrupted (Ctrl-C); rerun the same command to resume"
        code = rec.get("returncode")
        return (FAILED, f"exit code {code}") if code else (PENDING, "exited 0 without marker")
    live = live_pids(rec)
    if live:
        return RUNNING, f"pid {live[0][0]}"
    if rec.get("host") == socket.gethostname() and not rec.get("process_starts"):
        # A record from before process start times were kept: trust the pid.
        pids = [int(p) for p in rec.get("pids", [])]
        if any(process_alive(p) for p in pids):
            return RUNNING, f"pid {pids[0]}"
    return FAILED, "process vanished without a marker"
