"""The multi-host sections of ``cluster``: ``cluster.hosts`` (plain SSH machines),
``cluster.tpu_vm`` (TPU VM workers reached through ``gcloud``) and ``cluster.multihost``
(what both launchers share: remote workdir, setup lines, retries, polling, starts).

Read by ``launchers.hosts``; defaults are documented in ``conf/cluster/hosts.yaml`` and
``conf/cluster/tpu_vm.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from lib.config.fields import bounded


class CodeSync(StrEnum):
    none = "none"  # the hosts see the same tree (a shared home, NFS): nothing is copied
    archive = "archive"  # `git archive HEAD` unpacked under the remote workdir, per host
    # the working tree's git-tracked files rsync'ed into the remote workdir (on tpu_vm over
    # the ssh gcloud would run for each worker)
    rsync = "rsync"


class RunStorage(StrEnum):
    shared = "shared"  # the run dir is at the same path on every host (a shared home, NFS)
    # each host keeps its own run dir, <its workdir>/runs/<run name>: the launcher pushes
    # the completed outputs there before each stage (rsync over ssh) and pulls each task's
    # outputs and markers back over SFTP (verified, resumable) when it ends (on tpu_vm over
    # the ssh gcloud would run for each worker: its address, key and host-key alias)
    sync = "sync"


@dataclass
class HostEntry:
    """One SSH machine. Unset values come from ``cluster.multihost``'s defaults."""

    address: str = "???"
    port: int = bounded(22, ge=1, le=65535)
    name: str | None = None  # how messages and log prefixes name it; null: the address
    user: str | None = None
    key_file: str | None = None  # null with agent=false: ssh's own defaults
    agent: bool = False
    known_hosts: str | None = None  # null: cluster.multihost.known_hosts
    slots: int = bounded(1, ge=1)  # tasks it runs at once (one rank each in a distributed stage)
    env: dict[str, str] = field(default_factory=dict)  # e.g. {CUDA_VISIBLE_DEVICES: "0"}
    workdir: str | None = None  # null: cluster.multihost.workdir (absolute)


@dataclass
class TpuVmConfig:
    """TPU VM workers: every remote call is `gcloud compute tpus tpu-vm ssh NAME --worker=i`."""

    name: str | None = None  # the TPU (or, with several slices, each of ``names``)
    names: list[str] = field(default_factory=list)
    zone: str | None = None
    project: str | None = None
    # null: read with `gcloud compute tpus tpu-vm describe` (its networkEndpoints)
    workers: int | None = bounded(None, ge=1)
    internal_ip: bool = False
    tunnel_through_iap: bool = False
    user: str | None = None  # USER@NAME; null: gcloud's default
    ssh_key_file: str | None = None
    # More flags for the ssh that gcloud runs, each passed as --ssh-flag=F (e.g. "-p 2222",
    # "-o ProxyJump=bastion"); host keys stay checked (gcloud's options come first).
    ssh_flags: list[str] = field(default_factory=list)
    gcloud: str = "gcloud"
    # Before a task starts on a worker: kill processes holding /dev/accel* or /dev/vfio/*
    # and remove /tmp/libtpu_lockfile (what a killed earlier run leaves behind).
    clear_accelerator_holders: bool = True
    # Tasks a worker runs at once (one rank each in a distributed stage). One process owns
    # a worker's TPU: more than 1 suits CPU stages (k-means, metrics on device=cpu; under
    # storage=sync a distributed stage's ranks share one worker) and needs
    # clear_accelerator_holders=false.
    slots: int = bounded(1, ge=1)


@dataclass
class MultihostConfig:
    # Where tasks run on the hosts (absolute); null: this checkout's path (a shared file
    # system). code_sync=archive unpacks HEAD as workdir/COMMIT and runs there;
    # code_sync=rsync copies the tracked files of the working tree into workdir itself.
    # cluster=tpu_vm: {name} and {worker} in it are the TPU's name and the worker's index
    # (workers that share a file system each get their own; storage=sync needs that).
    workdir: str | None = None
    # Shell lines run before every task (venv activation, module load): shell, as written.
    setup: list[str] = field(default_factory=list)
    code_sync: CodeSync = CodeSync.none
    # Where the run dir is on the hosts: shared (the local run dir's path, seen by every
    # host) or sync (each host's own <workdir>/runs/<run name>, copied both ways).
    storage: RunStorage = RunStorage.shared
    known_hosts: str = "~/.ssh/known_hosts"  # host keys are checked; an unknown key is refused
    user: str | None = None
    key_file: str | None = None
    connect_timeout_s: int = bounded(10, ge=1)
    # A task whose host fails (ssh 255, host gone, non-zero exit) runs again on another
    # host, at most this many times; a host that fails twice leaves the pool.
    max_task_retries: int = bounded(2, ge=0)
    host_failures_to_drop: int = bounded(2, ge=1)
    fail_fast: bool = False  # the first failure stops every task of the run
    # False: launch.py starts a detached scheduler and returns once tasks run; True
    # (--attach): the scheduler stays in the foreground, streaming every task's log.
    attach: bool = False
    poll_s: float = bounded(1.0, ge=0.05)
    # Spacing between task starts and how many tasks are in their start phase at once (a
    # dataset or model server can be overwhelmed by many hosts loading at the same
    # moment): a start phase lasts from the ssh start until the task is ready (it created
    # its ready file, lib.runtime.ready: the embed and extract stages once their model is
    # loaded, the others as they begin) or has ended; it also bounds the ssh commands in
    # flight.
    start_stagger_s: float = bounded(0.0, ge=0.0)
    max_concurrent_starts: int = bounded(32, ge=1)
    command_timeout_s: int = bounded(120, ge=5)  # one remote command (start, probe, cancel)
