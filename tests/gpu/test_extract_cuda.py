"""The extract stage on CUDA, on a random tiny Qwen2 (hidden 64, 4 heads, 2 KV heads, 6
layers, safetensors): the torch backend's pinned-buffer copies give the CPU forward's
numbers, across batches of different sizes that reuse the buffers; bf16 compute is close
to fp32 on the CPU; a real CUDA out-of-memory halves the batch and keeps the outputs; the
JAX backend on the GPU equals the torch backend; ``launch.py stages=[extract]`` with
``extract.device=cuda`` writes the shards a CPU run writes, within fp32 tolerance.

Tolerances: fp32 on CUDA (no TF32: torch's default for matmuls, JAX asked for float32
precision) against fp32 on the CPU within 1e-4 absolute and relative, as the CPU tests
compare backends; bf16 compute: every token's cosine to the fp32 CPU vector >= 0.999 (on
the CPU, bf16 compute gave >= 0.99994 on this model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lib.core.paths import RunPaths
from lib.extract import ActivationReader
from lib.extract.model import TorchForward, resolve_model
from lib.extract.samples import Sample
from tests.conftest import run_launch
from tests.unit.extract.helpers import forward_params, texts, tiny_qwen2, write_jsonl

pytestmark = pytest.mark.gpu

LAYERS = [0, 2, 5, 6]  # 0: the embeddings, 6: the last layer after the final norm


def _p(**kw):
    return forward_params(
        **{"device": "cuda", "compute_dtype": "fp32", "layers": LAYERS, "max_seq_length": 48, **kw}
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract-cuda")
    model_dir = tiny_qwen2(root, layers=6)
    return {"root": root, "dir": model_dir, "source": resolve_model(str(model_dir))}


def _samples(lengths: list[int], seed: int, start: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [
        Sample(
            start + i,
            rng.integers(3, 500, n).astype(np.int32),
            np.zeros(n, np.int64),
            np.arange(n, dtype=np.int32),
        )
        for i, n in enumerate(lengths)
    ]


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# Batches of 4, 2 and 4 samples of varied length: the pinned buffers grow, are reused
# for a smaller batch, then for a larger one again.
BATCHES = [_samples([5, 48, 17, 30], 0), _samples([9, 3], 1, 4), _samples([48] * 4, 2, 6)]


def test_pinned_cuda_copies_equal_the_cpu_forward(tiny):
    cpu = TorchForward(tiny["source"], _p(device="cpu"), pad_id=0)
    gpu = TorchForward(tiny["source"], _p(), pad_id=0)
    gpu_bf16 = TorchForward(tiny["source"], _p(dtype="bf16"), pad_id=0)
    assert gpu.device == "cuda" and gpu.pinned is not None
    try:
        got = [gpu(b) for b in BATCHES]  # all kept, then compared: no later batch
        bits = [gpu_bf16(b) for b in BATCHES]  # may overwrite an earlier one's arrays
        want = [cpu(b) for b in BATCHES]
        assert gpu.pinned.buffers and all(b.is_pinned() for b in gpu.pinned.buffers.values())
        for batch, g, w, bf in zip(BATCHES, got, want, bits, strict=True):
            tokens = sum(len(s.token_ids) for s in batch)
            for k in LAYERS:
                assert g[k].shape == (tokens, 64) and g[k].dtype == np.float32
                np.testing.assert_allclose(g[k], w[k], atol=1e-4, rtol=1e-4)
                # bf16 storage: the GPU's fp32 values rounded to bf16 (within one bf16 ulp
                # of the CPU's, whose fp32 values differ in the last bits)
                assert bf[k].dtype == np.uint16
                np.testing.assert_allclose(_bf16_to_f32(bf[k]), w[k], rtol=2**-7, atol=1e-4)
    finally:
        for f in (cpu, gpu, gpu_bf16):
            f.close()


def test_bf16_compute_on_cuda_is_close_to_fp32_on_the_cpu(tiny):
    gpu = TorchForward(tiny["source"], _p(compute_dtype=None), pad_id=0)
    cpu = TorchForward(tiny["source"], _p(device="cpu"), pad_id=0)
    assert gpu.compute_dtype == "bf16"  # the default on CUDA
    assert {p.dtype for p in gpu.model.parameters()} == {torch.bfloat16}
    try:
        for batch in BATCHES:
            g, w = gpu(batch), cpu(batch)
            for k in LAYERS:
                cos = _cosines(g[k].astype(np.float32), w[k])
                assert cos.min() >= 0.999, (k, cos.min())
    finally:
        gpu.close()
        cpu.close()


def test_a_real_cuda_oom_halves_the_batch_and_keeps_the_outputs(tiny):
    """Eager attention (its (batch, heads, seq, seq) fp32 scores make the memory a batch
    needs predictable): 64 x 1024 tokens need about 2 GB a layer; the cap leaves 512 MB."""
    from transformers import AutoModelForCausalLM

    model = (
        AutoModelForCausalLM.from_pretrained(
            tiny["dir"], dtype=torch.float32, attn_implementation="eager"
        )
        .to("cuda")
        .eval()
    )
    batch = _samples([1024] * 64, 3)
    p = _p(batch_size=64, max_seq_length=1024)
    uncapped = TorchForward(None, p, pad_id=0, model=model)
    reference = uncapped(batch)
    uncapped.close()  # its hooks off the shared model (its last one would stop the pass)
    capped = TorchForward(None, p, pad_id=0, model=model)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(
        (torch.cuda.memory_allocated() + (512 << 20))
        / torch.cuda.get_device_properties(0).total_memory
    )
    try:
        out = capped(batch)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert capped.oom_halvings, "the capped batch did not run out of memory"
    assert capped.oom_halvings[0] == {"rows": 64, "tokens": 1024, "retry_rows": 32}
    assert 1 <= capped.max_rows < 64
    for k in LAYERS:
        assert out[k].shape == reference[k].shape == (64 * 1024, 64)
        np.testing.assert_allclose(out[k], reference[k], atol=1e-4, rtol=1e-4)


def test_the_jax_backend_on_the_gpu_equals_torch(tiny):
    import jax

    from lib.extract.jax_forward import JaxForward

    torch_fwd = TorchForward(tiny["source"], _p(), pad_id=0)
    with jax.default_matmul_precision("float32"):
        jax_fwd = JaxForward(tiny["source"], _p(), pad_id=0)
        assert {d.platform for d in jax_fwd.mesh.devices.flat} == {"gpu"}
        try:
            for batch in BATCHES:
                got, want = jax_fwd(batch), torch_fwd(batch)
                for k in LAYERS:
                    np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=1e-4)
        finally:
            jax_fwd.close()
            torch_fwd.close()


def test_launch_with_extract_device_cuda_writes_what_a_cpu_run_writes(tiny):
    root: Path = tiny["root"]
    data = write_jsonl(root / "docs.jsonl", texts(12))
    args = [
        "dataset=files",
        f"dataset.path={data}",
        "stages=[extract]",
        f"extract.model={tiny['dir']}",
        "extract.layers=[2,6]",
        "extract.max_seq_length=32",
        "extract.batch_size=4",
        "extract.compute_dtype=fp32",
        "extract.dtype=fp32",
        "extract.shard_size_mb=0.02",
        "extract.num_tasks=2",
        "cluster.parallelism=1",
        f"run.root={root}/runs",
    ]
    runs = {}
    for dev in ("cuda", "cpu"):
        proc = run_launch(*args, f"run.name={dev}", f"extract.device={dev}")
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        runs[dev] = RunPaths(root / "runs" / dev)
    meta = {d: r.storage.read_json(r.extract_metadata) for d, r in runs.items()}
    assert meta["cuda"]["samples"] == meta["cpu"]["samples"] == 12
    # Per sample, not per shard: the cap counts compressed bytes, which the last bits of
    # the values change, so the shard boundaries of the two runs may differ.
    gpu, cpu = ActivationReader(runs["cuda"]), ActivationReader(runs["cpu"])
    for layer in (2, 6):
        for i in range(12):
            g, c = gpu.sample(i, layer, as_torch=False), cpu.sample(i, layer, as_torch=False)
            assert g.shape == c.shape and g.shape[1] == 64
            np.testing.assert_allclose(g, c, atol=1e-4, rtol=1e-4)
