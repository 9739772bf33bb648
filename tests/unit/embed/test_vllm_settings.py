"""vLLM engine settings resolved per device: CUDA graphs and vLLM's memory share on CUDA,
the CPU build's values there; explicit settings always win."""

import pytest
from omegaconf import OmegaConf

from lib.core.errors import ModelError
from lib.embed.backends.vllm import engine_settings
from lib.embed.params import VllmParams, gpus_per_task


def _vcfg(**values):
    cfg = OmegaConf.structured(VllmParams)
    for k, v in values.items():
        cfg[k] = v
    return cfg


def test_defaults_are_per_device():
    assert engine_settings(_vcfg(), cpu_build=False) == {
        "gpu_memory_utilization": 0.9,
        "enforce_eager": False,
    }
    assert engine_settings(_vcfg(), cpu_build=True) == {
        "gpu_memory_utilization": 0.2,
        "enforce_eager": True,
    }


def test_explicit_settings_win_on_every_device():
    vcfg = _vcfg(gpu_memory_utilization=0.5, enforce_eager=True)
    for cpu_build in (False, True):
        assert engine_settings(vcfg, cpu_build=cpu_build) == {
            "gpu_memory_utilization": 0.5,
            "enforce_eager": True,
        }


def test_a_fraction_outside_the_range_is_refused():
    vcfg = OmegaConf.create({"gpu_memory_utilization": 1.5, "enforce_eager": None})
    with pytest.raises(ModelError, match=r"gpu_memory_utilization=1.5 must be in \(0, 1\]"):
        engine_settings(vcfg, cpu_build=False)


def test_an_embed_task_holds_tensor_parallel_size_gpus_with_vllm_only():
    vllm = OmegaConf.create({"backend": "vllm", "vllm": {"tensor_parallel_size": 4}})
    hf = OmegaConf.create({"backend": "hf", "vllm": {"tensor_parallel_size": 4}})
    assert gpus_per_task(vllm) == 4 and gpus_per_task(hf) == 1
