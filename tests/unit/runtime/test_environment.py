"""Task identity and rendezvous as each launcher's task environment resolves them: local
(and torchrun), SLURM (arrays split into chunks, srun steps) and submitit."""

from __future__ import annotations

import pytest

from lib.runtime.environment import (
    HostsEnvironment,
    LocalEnvironment,
    SubmititEnvironment,
    current_environment,
    port_for_job,
)
from lib.runtime.identity import TaskIdentity, TaskIdentityError, identity_env
from lib.runtime.slurm import SlurmEnvironment, first_host


def test_the_local_launcher_variables_round_trip():
    ident = TaskIdentity("s3://bucket/runs/x", "kmeans_level1", 0, 1, rank=1, world_size=2)
    env = identity_env(ident, "local")
    assert env["EMBEDFLEET_LAUNCHER"] == "local"
    resolved = current_environment(env)
    assert isinstance(resolved, LocalEnvironment)
    assert resolved.identity("kmeans_level1") == ident
    assert resolved.identity("kmeans_level1").label() == "kmeans_level1 0 r1"


def test_precedence_of_index_and_run_dir():
    env = LocalEnvironment({"EMBEDFLEET_RUN_DIR": "/r", "EMBEDFLEET_TASK_INDEX": "3"})
    assert env.identity("embed", num_tasks=8).task_index == 3
    assert env.identity("embed", task_index=5, num_tasks=8).task_index == 5  # the flag wins
    assert env.identity("embed", run_dir="/other").run_dir == "/other"
    with pytest.raises(TaskIdentityError, match=r"outside 0\.\.1"):
        env.identity("embed", num_tasks=2)
    with pytest.raises(TaskIdentityError, match="no run dir"):
        LocalEnvironment({}).identity("embed")
    with pytest.raises(TaskIdentityError, match="EMBEDFLEET_TASK_INDEX='x' is not an integer"):
        LocalEnvironment({"EMBEDFLEET_RUN_DIR": "/r", "EMBEDFLEET_TASK_INDEX": "x"}).task_index()


def test_local_and_torchrun_rendezvous():
    env = LocalEnvironment(
        {
            "RANK": "2",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "2",
            "MASTER_ADDR": "10.0.0.5",
            "MASTER_PORT": "4242",
        }
    )
    assert env.rank_world() == (2, 4) and env.local_rank() == 2
    assert env.rendezvous() == ("10.0.0.5", 4242)
    assert LocalEnvironment({}).rendezvous() == ("127.0.0.1", 29500)
    assert LocalEnvironment({}).rank_world() == (0, 1)


def test_which_environment():
    assert type(current_environment({})) is LocalEnvironment
    assert type(current_environment({"SLURM_JOB_ID": "7"})) is SlurmEnvironment  # sbatch by hand
    assert type(current_environment({"EMBEDFLEET_LAUNCHER": "slurm"})) is SlurmEnvironment
    assert type(current_environment({"EMBEDFLEET_LAUNCHER": "submitit"})) is SubmititEnvironment
    # the local launcher inside an salloc: its own variables, not the allocation's, count
    inside = current_environment({"EMBEDFLEET_LAUNCHER": "local", "SLURM_JOB_ID": "7",
                                  "SLURM_PROCID": "3", "SLURM_NTASKS": "8"})  # fmt: skip
    assert type(inside) is LocalEnvironment and inside.rank_world() == (0, 1)
    assert type(current_environment({"EMBEDFLEET_LAUNCHER": "hosts"})) is HostsEnvironment
    with pytest.raises(TaskIdentityError, match="names no task environment; known: hosts, local"):
        current_environment({"EMBEDFLEET_LAUNCHER": "k8s"})


def test_hosts_environment_takes_the_launchers_variables():
    env = HostsEnvironment(
        {"EMBEDFLEET_RUN_DIR": "/r", "EMBEDFLEET_TASK_INDEX": "0", "EMBEDFLEET_NUM_TASKS": "1",
         "RANK": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "10.77.0.11", "MASTER_PORT": "31234",
         "EMBEDFLEET_HOST": "n2"}
    )  # fmt: skip
    assert env.identity("kmeans_level1") == TaskIdentity("/r", "kmeans_level1", 0, 1, 2, 3)
    assert env.rendezvous() == ("10.77.0.11", 31234)
    assert env.describe() == "hosts on n2"


def test_slurm_array_chunks_and_srun_steps():
    array = SlurmEnvironment(
        {"EMBEDFLEET_RUN_DIR": "/r", "SLURM_JOB_ID": "11", "SLURM_ARRAY_TASK_ID": "7",
         "EMBEDFLEET_TASK_OFFSET": "1000"}
    )  # fmt: skip
    assert array.identity("embed", num_tasks=3000).task_index == 1007
    assert SlurmEnvironment({"SLURM_ARRAY_TASK_ID": "7"}).task_index() == 7
    # the sbatch script exports the task index it computed: that wins
    assert (
        SlurmEnvironment({"SLURM_ARRAY_TASK_ID": "7", "EMBEDFLEET_TASK_INDEX": "2"}).task_index()
        == 2
    )
    step = SlurmEnvironment(
        {"SLURM_JOB_ID": "123456", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
         "SLURM_JOB_NODELIST": "gpu[07-08]"}
    )  # fmt: skip
    assert step.rank_world() == (5, 8) and step.local_rank() == 1
    addr, port = step.rendezvous()
    assert addr == "gpu07" and port == port_for_job(123456) == 20000 + 123456 % 20000
    # torchrun inside an allocation: its variables win
    mixed = SlurmEnvironment(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "RANK": "1", "WORLD_SIZE": "2"}
    )
    assert mixed.rank_world() == (1, 2)


def test_first_host_of_a_nodelist():
    assert first_host("node[01-04],gpu7") == "node01"
    assert first_host("gpu7") == "gpu7"


def test_slurm_stop_policy_comes_from_the_cluster_config():
    from omegaconf import OmegaConf

    env = SlurmEnvironment({"SLURM_JOB_ID": "1"})
    assert env.stop_signal() == "USR2"
    cluster = OmegaConf.create(
        {"slurm": {"signal": "USR1", "signal_delay_s": 60, "max_restarts": 9}}
    )
    env.configure(cluster)
    assert (env.stop_signal(), env.signal_delay_s, env.max_restarts) == ("USR1", 60.0, 9)


def test_submitit_jobs_take_rank_and_hosts_from_submitit(monkeypatch):
    for key, value in {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_JOB_ID": "4321",
        "SUBMITIT_LOCAL_NTASKS": "3",
        "SUBMITIT_LOCAL_GLOBALID": "2",
        "SUBMITIT_LOCAL_LOCALID": "2",
        "SUBMITIT_LOCAL_NODEID": "0",
        "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
    }.items():
        monkeypatch.setenv(key, value)
    env = SubmititEnvironment({"EMBEDFLEET_LAUNCHER": "submitit", "EMBEDFLEET_RUN_DIR": "/r"})
    assert env.rank_world() == (2, 3) and env.local_rank() == 2
    addr, port = env.rendezvous()
    assert port == port_for_job(4321) and addr
    ident = env.identity("kmeans_level1", task_index=0, num_tasks=1)
    assert (ident.rank, ident.world_size) == (2, 3)
    assert "relaunch" in env.after_stop()  # the local executor has no scheduler to requeue


def test_submitit_outside_a_job_falls_back(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    env = SubmititEnvironment({"RANK": "1", "WORLD_SIZE": "2"})
    assert env.rank_world() == (1, 2)
    assert SubmititEnvironment({}).rank_world() == (0, 1)
