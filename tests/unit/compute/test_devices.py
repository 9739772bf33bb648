"""Which GPUs each process of a local launch gets, and which CUDA device a rank takes:
pure functions, checked over num_gpus x world_size without a GPU."""

from __future__ import annotations

import datetime

import pytest
import torch
from omegaconf import OmegaConf

from lib.compute.devices import (
    describe_local_gpus,
    gpu_index,
    local_device_env,
    rank_devices,
    stage_uses_gpus,
)
from lib.compute.distributed import DistEnv, init_kwargs
from lib.config.schema import EmbedfleetConfig
from lib.core.errors import ConfigError


@pytest.mark.parametrize("num_gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8, 16])
def test_every_rank_gets_its_own_gpu_or_the_launch_is_refused(num_gpus, world):
    if world > num_gpus:
        with pytest.raises(ConfigError, match="cluster.share_gpus=true"):
            rank_devices(num_gpus, world)
        shared = rank_devices(num_gpus, world, share=True)
        assert shared == [(r % num_gpus,) for r in range(world)]
        return
    gpus = rank_devices(num_gpus, world)
    assert gpus == [(r,) for r in range(world)]
    envs = [local_device_env(num_gpus, slot=0, rank=r, world=world) for r in range(world)]
    visible = [e["CUDA_VISIBLE_DEVICES"] for e in envs]
    assert len(set(visible)) == world  # no two ranks on one GPU
    if world > 1:
        assert [e["LOCAL_RANK"] for e in envs] == [str(r) for r in range(world)]
        assert all("LOCAL_WORLD_SIZE" not in e for e in envs)  # bound: each sees its own
        # Each rank sees one device and takes it: local_rank % 1 == 0, never cuda:<rank>.
        assert {gpu_index(r, 1) for r in range(world)} == {0}


@pytest.mark.parametrize(("num_gpus", "tp"), [(8, 2), (8, 4), (4, 4), (6, 4), (8, 8)])
def test_tensor_parallel_tasks_get_disjoint_groups_of_gpus(num_gpus, tp):
    slots = num_gpus // tp
    groups = [
        local_device_env(num_gpus, slot=s, rank=0, world=1, per_task=tp)["CUDA_VISIBLE_DEVICES"]
        for s in range(slots)
    ]
    used = [int(g) for grp in groups for g in grp.split(",")]
    assert all(len(grp.split(",")) == tp for grp in groups)
    assert sorted(used) == list(range(slots * tp))  # disjoint, none twice
    line = describe_local_gpus(num_gpus, tp, {})
    assert f"{slots} task(s) at once, {tp} GPU(s) each (embed.vllm.tensor_parallel_size)" in line


def test_a_tensor_parallel_size_above_the_gpus_is_refused():
    with pytest.raises(ConfigError, match="needs 4 GPUs .* cluster.num_gpus=2"):
        describe_local_gpus(2, 4, {})


def test_without_gpus_nothing_is_bound_and_ranks_know_how_many_share_the_host():
    assert local_device_env(0, slot=1, rank=0, world=1) == {}
    env = local_device_env(0, slot=0, rank=1, world=2)
    assert env == {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert describe_local_gpus(0, 1, {"kmeans_level1": 4}) is None


@pytest.mark.parametrize(("world", "count"), [(2, 1), (3, 2), (8, 4)])
def test_unbound_ranks_refuse_to_share_a_gpu_unless_told(world, count):
    # num_gpus=0, world_size=2 on a one-GPU host used to put rank 1 on cuda:1.
    with pytest.raises(ConfigError, match=f"{world} ranks on this host but {count} GPU"):
        gpu_index(world - 1, count, local_world=world)
    assert [gpu_index(r, count, local_world=world, share=True) for r in range(world)] == [
        r % count for r in range(world)
    ]


def test_unbound_ranks_with_enough_gpus_take_local_rank_modulo_count():
    assert [gpu_index(r, 8, local_world=8) for r in range(8)] == list(range(8))
    assert [gpu_index(r, 8, local_world=None) for r in (8, 9)] == [0, 1]  # torchrun, 2 nodes


def test_the_launchers_own_visible_devices_are_mapped_through():
    env = local_device_env(2, slot=0, rank=1, world=2, parent_visible="3,5")
    assert env["CUDA_VISIBLE_DEVICES"] == "5"
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=3 makes 1 GPU"):
        local_device_env(2, slot=0, rank=1, world=2, parent_visible="3")


def test_the_plan_line_names_each_gpu_stage_layout():
    line = describe_local_gpus(2, 1, {"kmeans_level1": 2, "kmeans_level2": 1})
    assert line.startswith("GPUs: 2 (cluster.num_gpus); sharded stages run 2 task(s) at once")
    assert "kmeans_level1: ranks on GPUs 0,1" in line and "kmeans_level2" not in line
    shared = describe_local_gpus(2, 1, {"kmeans_level1": 3}, share=True)
    assert "ranks on GPUs 0,1,0 (shared: cluster.share_gpus)" in shared
    with pytest.raises(ConfigError, match="3 rank"):
        describe_local_gpus(2, 1, {"kmeans_level1": 3})


def test_only_stages_with_a_device_setting_get_gpus():
    cfg = OmegaConf.structured(EmbedfleetConfig)
    assert stage_uses_gpus(cfg, "embed") and stage_uses_gpus(cfg, "kmeans")
    assert not any(stage_uses_gpus(cfg, g) for g in ("merge", "curate", "metrics", "nope"))
    cfg.kmeans.device = "cpu"
    assert not stage_uses_gpus(cfg, "kmeans")


def test_the_nccl_group_is_bound_to_the_ranks_device():
    de = DistEnv(rank=1, world_size=2, local_rank=1, master_addr="127.0.0.1", master_port=29500)
    cuda = init_kwargs(de, torch.device("cuda", 0), 60.0)
    assert cuda["backend"] == "nccl" and cuda["device_id"] == torch.device("cuda", 0)
    assert cuda["timeout"] == datetime.timedelta(seconds=60)
    cpu = init_kwargs(de, torch.device("cpu"), 60.0)
    assert cpu["backend"] == "gloo" and "device_id" not in cpu
    # Ranks that may share a GPU: NCCL refuses two ranks on one device, gloo does not.
    shared = init_kwargs(de, torch.device("cuda", 0), 60.0, shared_gpu=True)
    assert shared["backend"] == "gloo" and "device_id" not in shared
