"""The local launcher's GPU binding, in real processes on a machine without a GPU: each
task or rank is started with its own CUDA_VISIBLE_DEVICES, vLLM tasks get
tensor_parallel_size GPUs, CPU stages none, and an impossible layout is refused before any
task starts (``lib.compute.devices`` holds the rules; tests/unit/compute/test_devices.py)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from launchers.local import LocalLauncher
from lib.core.errors import ConfigError
from lib.core.paths import RunPaths
from lib.plan.spec import ARRAY, DISTRIBUTED, Plan, StageSpec

JOB = "tests.unit.launchers.device_job"


@pytest.fixture(autouse=True)
def _no_parent_binding(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _cfg(num_gpus: int, tp: int = 1, share: bool = False):
    return OmegaConf.create(
        {
            "cluster": {"launcher": "local", "num_gpus": num_gpus, "parallelism": 2, "env": {},
                        "share_gpus": share},
            "embed": {"backend": "vllm", "device": "auto", "vllm": {"tensor_parallel_size": tp}},
            "kmeans": {"device": "auto"},
            "metrics": {"world_size": 2},
        }
    )  # fmt: skip


def _stage(name: str, group: str, tasks: int, kind: str = ARRAY, world: int = 1) -> StageSpec:
    return StageSpec(name, group, JOB, name, kind, tasks, "h", world_size=world)


def _seen(run, stage: str) -> dict[tuple[int, int], dict]:
    out = {}
    for p in (run / stage / "out").glob("*.*.json"):
        task, rank = (int(x) for x in p.stem.split("."))
        out[(task, rank)] = json.loads(p.read_text())
    return out


def test_each_rank_and_each_tensor_parallel_task_gets_its_own_gpus(tmp_path, capsys):
    plan = Plan(
        [
            _stage("embed", "embed", 2),
            _stage("kmeans_level1", "kmeans", 1, DISTRIBUTED, world=4),
            _stage("metrics_level1", "metrics", 1, DISTRIBUTED, world=2),
        ],
        0,
    )
    result = LocalLauncher(_cfg(num_gpus=4, tp=2)).launch(RunPaths(tmp_path), plan)
    assert result.complete
    embed = _seen(tmp_path, "embed")
    assert {r["CUDA_VISIBLE_DEVICES"] for r in embed.values()} == {"0,1", "2,3"}
    kmeans = _seen(tmp_path, "kmeans_level1")
    assert [kmeans[(0, r)]["CUDA_VISIBLE_DEVICES"] for r in range(4)] == ["0", "1", "2", "3"]
    assert [kmeans[(0, r)]["LOCAL_RANK"] for r in range(4)] == ["0", "1", "2", "3"]
    metrics = _seen(tmp_path, "metrics_level1")  # CPU ranks: no GPU bound
    assert all(r["CUDA_VISIBLE_DEVICES"] is None for r in metrics.values())
    assert {r["LOCAL_WORLD_SIZE"] for r in metrics.values()} == {"2"}
    out = capsys.readouterr().out
    assert "GPUs: 4 (cluster.num_gpus); sharded stages run 2 task(s) at once, 2 GPU(s)" in out
    assert "kmeans_level1: ranks on GPUs 0,1,2,3" in out


def test_more_gpu_ranks_than_gpus_is_refused_before_any_task_or_shared_when_asked(tmp_path):
    plan = Plan([_stage("kmeans_level1", "kmeans", 1, DISTRIBUTED, world=3)], 0)
    with pytest.raises(ConfigError, match="3 rank.* cluster.num_gpus=2 .* cluster.share_gpus"):
        LocalLauncher(_cfg(num_gpus=2)).launch(RunPaths(tmp_path / "a"), plan)
    assert not (tmp_path / "a" / "kmeans_level1").exists()
    LocalLauncher(_cfg(num_gpus=2, share=True)).launch(RunPaths(tmp_path / "b"), plan)
    seen = _seen(tmp_path / "b", "kmeans_level1")
    assert [seen[(0, r)]["CUDA_VISIBLE_DEVICES"] for r in range(3)] == ["0", "1", "0"]


def test_the_dry_run_says_how_the_gpus_are_split(tmp_path, capsys):
    plan = Plan([_stage("embed", "embed", 4)], 0)
    LocalLauncher(_cfg(num_gpus=8, tp=4)).launch(RunPaths(tmp_path), plan, dry_run=True)
    out = capsys.readouterr().out
    assert "sharded stages run 2 task(s) at once, 4 GPU(s) each" in out
    assert "embed.vllm.tensor_parallel_size" in out and not (tmp_path / "embed" / "out").exists()
