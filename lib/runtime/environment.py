"""The task environment: what a launcher tells the task it started, read in one place.

Each launcher has one ``TaskEnvironment``, named by ``EMBEDFLEET_LAUNCHER`` in the task's
environment (detected from the scheduler's variables when a task is started by hand). It
resolves the task's identity, the rendezvous of a distributed job, and what to do after
a stop signal; job code asks it and never calls a scheduler.

Precedence, for every environment:

- task index: ``--task-index`` > ``EMBEDFLEET_TASK_INDEX`` > the scheduler's own index
  (SLURM: ``SLURM_ARRAY_TASK_ID + EMBEDFLEET_TASK_OFFSET``) > 0;
- rank/world: ``RANK``/``WORLD_SIZE`` (the local launcher, torchrun) > the scheduler's
  (SLURM: ``SLURM_PROCID``/``SLURM_NTASKS``; submitit: its ``JobEnvironment``) > 0/1;
- rendezvous: ``MASTER_ADDR``/``MASTER_PORT`` > the scheduler's (SLURM: the first host of
  the allocation, a port derived from the job id) > 127.0.0.1:29500.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Mapping
from typing import Any

from lib.runtime import stop
from lib.runtime.identity import (
    ENV_LAUNCHER,
    ENV_NUM_TASKS,
    ENV_RUN_DIR,
    ENV_TASK_INDEX,
    TaskIdentity,
    TaskIdentityError,
    env_int,
)

DEFAULT_PORT = 29500
# Rendezvous ports derived from a job id: stable for all ranks of a job, and concurrent
# jobs rarely collide.
PORT_BASE, PORT_SPAN = 20000, 20000


def port_for_job(job_id: int) -> int:
    """The rendezvous port of a scheduler job (the one formula every launcher uses)."""
    return PORT_BASE + int(job_id) % PORT_SPAN


class TaskEnvironment:
    """How a task learns who it is, where its peers meet and what to do after a stop.

    The base class is the local launcher's: everything comes from ``EMBEDFLEET_*`` and
    torch.distributed's own variables."""

    name = "local"

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = dict(os.environ if env is None else env)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- identity ---------------------------------------------------------------------
    def scheduler_index(self) -> int | None:
        """The task index the scheduler gives this process, if any."""
        return None

    def task_index(self, explicit: int | None = None) -> int:
        if explicit is not None:
            return explicit
        for value in (env_int(self.env, ENV_TASK_INDEX), self.scheduler_index()):
            if value is not None:
                return value
        return 0

    def scheduler_rank_world(self) -> tuple[int, int] | None:
        return None

    def rank_world(self) -> tuple[int, int]:
        rank, world = env_int(self.env, "RANK"), env_int(self.env, "WORLD_SIZE")
        if rank is not None and world is not None:
            return rank, world
        return self.scheduler_rank_world() or (0, 1)

    def local_rank(self) -> int:
        value = env_int(self.env, "LOCAL_RANK")
        return value if value is not None else 0

    def identity(
        self,
        stage: str,
        *,
        run_dir: str | None = None,
        task_index: int | None = None,
        num_tasks: int | None = None,
    ) -> TaskIdentity:
        """This process's identity for ``stage``. Raises ``TaskIdentityError`` if the run
        dir is unknown or the index is out of range."""
        rd = run_dir if run_dir is not None else self.env.get(ENV_RUN_DIR)
        if not rd:
            raise TaskIdentityError(
                f"no run dir: pass --run-dir or set {ENV_RUN_DIR} (launch.py does this for you)"
            )
        index = self.task_index(task_index)
        total = num_tasks if num_tasks is not None else env_int(self.env, ENV_NUM_TASKS)
        rank, world = self.rank_world()
        if total is not None and not 0 <= index < total:
            raise TaskIdentityError(
                f"task index {index} is outside 0..{total - 1} for stage {stage}"
            )
        return TaskIdentity(str(rd), stage, index, total if total is not None else 1, rank, world)

    # -- rendezvous -------------------------------------------------------------------
    def scheduler_rendezvous(self) -> tuple[str | None, int | None]:
        return None, None

    def rendezvous(self) -> tuple[str, int]:
        """(address, port) where the ranks of a distributed task meet."""
        addr, port = self.env.get("MASTER_ADDR"), env_int(self.env, "MASTER_PORT")
        if addr is None or port is None:
            s_addr, s_port = self.scheduler_rendezvous()
            addr = addr or s_addr
            port = port if port is not None else s_port
        return addr or "127.0.0.1", port if port is not None else DEFAULT_PORT

    # -- stopping ---------------------------------------------------------------------
    def configure(self, cluster: Any) -> None:
        """Read this environment's settings from the run's ``cluster`` config section."""

    def stop_signal(self) -> str:
        """The warning signal the scheduler sends before it stops the task."""
        return "USR2"

    def install_stop_handler(self) -> None:
        stop.install(self.stop_signal())

    def after_stop(self) -> str:
        """Act on a stop signal that reached a safe point; return a message for the log.

        Locally there is no scheduler to bring the task back: say how to continue."""
        signame = stop.requested() or "a stop signal"
        return (
            f"stopped by {signame} outside SLURM: relaunch to continue (the same command, "
            "or `python launch.py retry RUN_DIR`); finished parts are kept"
        )

    def describe(self) -> str:
        return f"{self.name} on {socket.gethostname()}"


class LocalEnvironment(TaskEnvironment):
    """Tasks started by the local launcher (or by hand, or by torchrun)."""


class SubmititEnvironment(TaskEnvironment):
    """Tasks run by submitit: rank, world and hosts from submitit's own JobEnvironment; a
    stop on SLURM requeues as the SLURM environment does."""

    name = "submitit"

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)
        self._job = None
        self._slurm: TaskEnvironment | None = None
        if "SLURM_JOB_ID" in self.env:
            from lib.runtime.slurm import SlurmEnvironment

            self._slurm = SlurmEnvironment(self.env)

    def _submitit_job(self):
        if self._job is None:
            import submitit

            try:
                self._job = submitit.JobEnvironment()
            except RuntimeError:  # not inside a submitit job (a test, a task run by hand)
                self._job = False
        return self._job or None

    def scheduler_rank_world(self) -> tuple[int, int] | None:
        job = self._submitit_job()
        return (int(job.global_rank), int(job.num_tasks)) if job else None

    def local_rank(self) -> int:
        job = self._submitit_job()
        return int(job.local_rank) if job else super().local_rank()

    def scheduler_rendezvous(self) -> tuple[str | None, int | None]:
        job = self._submitit_job()
        if not job:
            return None, None
        job_id = str(job.job_id).split("_")[0]
        port = port_for_job(int(job_id)) if job_id.isdigit() else None
        return (job.hostnames[0] if job.hostnames else None), port

    def configure(self, cluster: Any) -> None:
        if self._slurm is not None:
            self._slurm.configure(cluster)

    def stop_signal(self) -> str:
        return self._slurm.stop_signal() if self._slurm is not None else super().stop_signal()

    def after_stop(self) -> str:
        return self._slurm.after_stop() if self._slurm is not None else super().after_stop()


class HostsEnvironment(TaskEnvironment):
    """Tasks started on SSH hosts or TPU VM workers (launchers.hosts): identity, rank,
    world and the rendezvous (the first placement's host, a port chosen once per run) all
    come in the ``EMBEDFLEET_*`` and torch.distributed variables the launcher sets."""

    name = "hosts"

    def describe(self) -> str:
        return f"{self.name} on {self.env.get('EMBEDFLEET_HOST') or socket.gethostname()}"


class TpuVmEnvironment(HostsEnvironment):
    name = "tpu_vm"


# The environment of each launcher, by the name it sets in EMBEDFLEET_LAUNCHER.
ENVIRONMENTS: dict[str, str] = {
    "local": "lib.runtime.environment:LocalEnvironment",
    "slurm": "lib.runtime.slurm:SlurmEnvironment",
    "submitit": "lib.runtime.environment:SubmititEnvironment",
    "hosts": "lib.runtime.environment:HostsEnvironment",
    "tpu_vm": "lib.runtime.environment:TpuVmEnvironment",
}


def _load(ref: str) -> type[TaskEnvironment]:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def current_environment(env: Mapping[str, str] | None = None) -> TaskEnvironment:
    """The environment of this process: the one its launcher named, else SLURM when a
    SLURM job is around (a script run with sbatch/srun by hand), else local."""
    env = os.environ if env is None else env
    name = env.get(ENV_LAUNCHER)
    if name:
        if name not in ENVIRONMENTS:
            raise TaskIdentityError(
                f"{ENV_LAUNCHER}={name!r} names no task environment; known: "
                f"{', '.join(sorted(ENVIRONMENTS))}"
            )
        return _load(ENVIRONMENTS[name])(env)
    if "SLURM_JOB_ID" in env:
        return _load(ENVIRONMENTS["slurm"])(env)
    return LocalEnvironment(env)
