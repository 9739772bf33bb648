"""The JAX backend (``extract.backend=jax``) on a random tiny Qwen2 (hidden 64, 4 heads,
2 KV heads, QKV biases, 6 layers, safetensors): its hidden states equal the torch
backend's and a direct ``output_hidden_states`` forward pass (fp32 on CPU, within 1e-4)
for truncated documents of varied length (padded) and packed contexts (the last batch
padded with empty rows); nothing recompiles across batches; the 1d and 2d meshes on 4
simulated CPU devices (a subprocess with ``--xla_force_host_platform_device_count=4``)
shard the parameters and give the 1-device numbers; bad mesh settings and models this
forward does not implement are refused naming the numbers and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from lib.config.compose import compose
from lib.core.errors import ConfigError
from lib.extract import checks
from lib.extract.checks import check_backend, check_extract_launch
from lib.extract.jax_forward import JaxForward
from lib.extract.jax_model import DecoderSpec
from lib.extract.mesh import mesh_layout
from lib.extract.model import TorchForward, resolve_model
from lib.extract.samples import Sample, batches
from tests.unit.extract.helpers import forward_params, texts, tiny_qwen2

REPO = Path(__file__).resolve().parents[3]
LAYERS = [0, 1, 3, 6]  # 0: embeddings, 6: the last layer after the final norm
SEQ = 24
BATCH = 4


def _p(**kw):
    return forward_params(**{"layers": LAYERS, "batch_size": BATCH, "max_seq_length": SEQ, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract-jax")
    model_dir = tiny_qwen2(root, layers=6)
    return {"root": root, "dir": model_dir, "source": resolve_model(str(model_dir))}


@pytest.fixture(scope="module")
def hf(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny["dir"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny["dir"])


@pytest.fixture(scope="module")
def jax_fwd(tiny):
    return JaxForward(tiny["source"], _p(), pad_id=0)


def _sample(i: int, ids: list[int]) -> Sample:
    n = len(ids)
    return Sample(i, np.asarray(ids, np.int32), np.zeros(n, np.int64), np.arange(n, dtype=np.int32))


def _truncated(tok, n: int) -> list[Sample]:
    """Documents' first SEQ tokens: lengths from a few tokens to SEQ (padded batches)."""
    docs = [t[: 8 + 12 * i] for i, t in enumerate(texts(n))]
    return [_sample(i, tok(d)["input_ids"][:SEQ]) for i, d in enumerate(docs)]


def _packed(tok, n: int) -> list[Sample]:
    stream: list[int] = []
    for t in texts(20):
        stream += [*tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    return [_sample(100 + i, stream[i * SEQ : (i + 1) * SEQ]) for i in range(n)]


def test_jax_equals_torch_and_a_direct_forward(tiny, hf, jax_fwd):
    model, tok = hf
    assert DecoderSpec.from_config(model.config, "tiny").kv_heads == 2
    assert "q_b" in jax_fwd.params["layers"][0]  # Qwen2's QKV bias is loaded and used
    torch_fwd = TorchForward(tiny["source"], _p(), pad_id=0)
    truncated, packed = _truncated(tok, 7), _packed(tok, 3)
    assert (
        len({len(s.token_ids) for s in truncated}) > 3
        and max(len(s.token_ids) for s in truncated) == SEQ
    )
    try:
        for samples in (truncated, packed):  # 7 = 4 + 3 and 3: last batches padded
            for batch in batches(iter(samples), BATCH, None):
                got, want = jax_fwd(batch), torch_fwd(batch)
                assert sorted(got) == LAYERS
                for k in LAYERS:
                    assert got[k].dtype == np.float32
                    np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=1e-4)
                offset = 0
                for s in batch:  # each sample alone, unpadded, through transformers
                    with torch.inference_mode():
                        hs = model(
                            torch.tensor([s.token_ids.tolist()]), output_hidden_states=True
                        ).hidden_states
                    n = len(s.token_ids)
                    for k in LAYERS:
                        np.testing.assert_allclose(
                            got[k][offset : offset + n], hs[k][0].numpy(), atol=1e-4, rtol=1e-4
                        )
                    offset += n
    finally:
        torch_fwd.close()


def test_bf16_store_is_the_bits_of_the_rounded_values(tiny, hf, jax_fwd):
    _, tok = hf
    batch = _truncated(tok, 3)
    bf16 = JaxForward(tiny["source"], _p(dtype="bf16", layers=[3]), pad_id=0)(batch)[3]
    assert bf16.dtype == np.uint16
    back = torch.from_numpy(bf16.view(np.int16)).view(torch.bfloat16).float()
    want = torch.from_numpy(jax_fwd(batch)[3]).to(torch.bfloat16).float()
    torch.testing.assert_close(back, want, atol=1e-2, rtol=1e-2)


def test_nothing_recompiles_across_batches(hf, jax_fwd):
    _, tok = hf
    samples = _truncated(tok, 7)
    jax_fwd(samples[:BATCH])  # compiled here (or by an earlier test)
    compiles: list[str] = []

    def listener(event: str, _duration: float, **_kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        # other lengths, a 1-sample and a 3-sample (padded) batch
        for batch in ([samples[6]], samples[1:4], samples[3:7], _packed(tok, 2)):
            jax_fwd(batch)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def _probe(tiny, batch: list[Sample], *meshes: str) -> tuple[dict, dict]:
    root: Path = tiny["root"]
    ids = np.zeros((len(batch), SEQ), np.int32)
    for i, s in enumerate(batch):
        ids[i, : len(s.token_ids)] = s.token_ids
    inp, out = root / "probe_in.npz", root / "probe_out.npz"
    np.savez(
        inp,
        ids=ids,
        lengths=np.asarray([len(s.token_ids) for s in batch]),
        layers=np.asarray(LAYERS),
        seq_len=SEQ,
    )
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.unit.extract.jax_mesh_probe",
            *(str(tiny["dir"]), str(inp), str(out)),
            *meshes,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(out) as z:
        arrays = {k.replace("__", "/"): z[k] for k in z.files}
    return report, arrays


def test_mesh_1d_and_2d_on_4_devices_equal_one_device(tiny, hf, jax_fwd):
    _, tok = hf
    batch = _truncated(tok, BATCH)
    one = jax_fwd(batch)  # this process: 1 CPU device
    assert len(jax.devices()) == 1
    report, got = _probe(tiny, batch, "1d,,4", "2d,2,4", "2d,3,4", "2d,2,3", "2d,,4")
    assert report["devices"] == 4
    one_d, two_d = report["1d,,4"], report["2d,2,4"]
    assert one_d["mesh"] == {"data": 1, "model": 4}
    assert two_d["mesh"] == {"data": 2, "model": 2}
    # q_proj (4 heads x 16, 64): whole heads per device; o_proj/down_proj by input columns;
    # 2 KV heads over a model axis of 4: replicated (1d), split over 2 (2d).
    assert one_d["shards"]["q_w"] == [[16, 64]] * 4
    assert one_d["shards"]["o_w"] == [[64, 16]] * 4
    assert one_d["shards"]["gate_w"] == [[32, 64]] * 4
    assert one_d["shards"]["down_w"] == [[64, 32]] * 4
    assert one_d["shards"]["k_w"] == [[32, 64]] * 4
    assert two_d["shards"]["k_w"] == [[16, 64]] * 4
    assert two_d["shards"]["q_b"] == [[32]] * 4
    for mesh in ("1d,,4", "2d,2,4"):
        for k in LAYERS:
            np.testing.assert_allclose(got[f"{mesh}/{k}"], one[k], atol=1e-5, rtol=1e-5)
    assert (
        "extract.mesh_model_axis=3 does not divide the 4 local device(s)"
        in (report["2d,3,4"]["error"])
    )
    assert (
        "extract.batch_size=3 is not divisible by the data axis of the mesh (2 = 4 "
        in (report["2d,2,3"]["error"])
    )
    assert "needs extract.mesh_model_axis=M" in report["2d,,4"]["error"]
    assert "has 4 device(s)" in report["2d,,4"]["error"]
    assert "M can be one of [1, 2, 4]" in report["2d,,4"]["error"]


def test_mesh_layout_errors_name_the_numbers():
    smol = {"heads": 9, "kv_heads": 3, "intermediate": 1536, "batch_size": 16, "where": "smol"}
    with pytest.raises(ConfigError, match=r"9 attention heads of smol .* 9 is not divisible by 4"):
        mesh_layout("1d", None, 4, **smol)
    assert mesh_layout("2d", 3, 6, **smol) == mesh_layout("2d", 3, 6, **smol)
    layout = mesh_layout("2d", 3, 6, **smol)
    assert (layout.data, layout.model, layout.shard_kv) == (2, 3, True)
    with pytest.raises(ConfigError, match=r"intermediate_size 1000\) .* not divisible by 3"):
        mesh_layout("2d", 3, 3, **{**smol, "intermediate": 1000})
    with pytest.raises(ConfigError, match="extract.mesh_model_axis=2 is for extract.mesh=2d"):
        mesh_layout("1d", 2, 4, **smol)
    with pytest.raises(ConfigError, match="extract.mesh=3d: choose one of 1d, 2d"):
        mesh_layout("3d", None, 4, **smol)


def test_launch_checks_the_mesh_against_the_model(tiny):
    def launch(*overrides: str):
        check_extract_launch(
            compose(
                [
                    "stages=[extract]",
                    f"extract.model={tiny['dir']}",
                    "extract.layers=[1]",
                    "extract.backend=jax",
                    *overrides,
                ]
            )
        )

    launch("extract.mesh=2d", "extract.mesh_model_axis=2")  # fits: 4 heads, MLP 128
    with pytest.raises(ConfigError, match=r"the 4 attention heads of .* not divisible by 3"):
        launch("extract.mesh=2d", "extract.mesh_model_axis=3")
    with pytest.raises(ConfigError, match="extract.mesh=2d needs extract.mesh_model_axis=M"):
        launch("extract.mesh=2d")
    with pytest.raises(ConfigError, match="extract.layers: \\[7\\] out of range"):
        launch("extract.layers=[7]")


def test_models_the_forward_does_not_implement_are_refused():
    from transformers import GPT2Config, LlamaConfig

    with pytest.raises(ConfigError, match="model_type 'gpt2': use extract.backend=torch"):
        DecoderSpec.from_config(GPT2Config(), "gpt2-dir")
    scaled = LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ConfigError, match="rope_type 'linear'"):
        DecoderSpec.from_config(scaled, "llama-dir")


def test_layer_out_of_range_is_refused_before_loading(tiny):
    with pytest.raises(ConfigError, match=r"\[9\] out of range: .* has 6 decoder layers"):
        JaxForward(tiny["source"], _p(layers=[3, 9]), pad_id=0)


def test_missing_jax_is_named_with_the_fix(monkeypatch):
    # JAX is installed here (make install); its absence is simulated at the one lookup.
    real = checks.importlib.util.find_spec
    monkeypatch.setattr(
        checks.importlib.util, "find_spec", lambda n, *a: None if n == "jax" else real(n, *a)
    )
    with pytest.raises(ConfigError, match=r"needs JAX.*make install.*extract.backend=torch"):
        check_backend("jax")
    check_backend("torch")
