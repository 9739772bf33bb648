"""A Llama/Qwen2-family decoder in plain JAX (the extract stage's ``jax`` backend) and
its weights read from the Hugging Face checkpoint.

transformers v5 has no Flax models, so this is the forward pass written out: token
embedding, then per decoder layer RMSNorm -> grouped-query attention (rotary embeddings
with the config's ``rope_theta``; Qwen2's q/k/v biases, Llama's ``attention_bias``) ->
residual -> RMSNorm -> SwiGLU MLP -> residual; the final RMSNorm for the last hidden
state. It mirrors ``transformers``' Llama/Qwen2 code step by step, casts included
(RMSNorm and softmax in fp32), so both backends return the same numbers. Hidden states
are numbered as ``output_hidden_states`` does (``lib.extract.model``).

Weights come from the model directory's ``*.safetensors`` (memory-mapped; only the
tensors of the layers that run are read), or, for a GGUF model, from the state dict of
the model transformers dequantizes. Never from a pickle.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lib.core.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

FAMILIES = ("llama", "qwen2")
# The parameter names of one decoder layer, relative to ``layers.<i>.``; the biases are
# optional (present in the checkpoint or not).
LAYER_WEIGHTS = {
    "ln1": "input_layernorm.weight",
    "q_w": "self_attn.q_proj.weight",
    "k_w": "self_attn.k_proj.weight",
    "v_w": "self_attn.v_proj.weight",
    "o_w": "self_attn.o_proj.weight",
    "ln2": "post_attention_layernorm.weight",
    "gate_w": "mlp.gate_proj.weight",
    "up_w": "mlp.up_proj.weight",
    "down_w": "mlp.down_proj.weight",
}
LAYER_BIASES = {
    "q_b": "self_attn.q_proj.bias",
    "k_b": "self_attn.k_proj.bias",
    "v_b": "self_attn.v_proj.bias",
    "o_b": "self_attn.o_proj.bias",
    "gate_b": "mlp.gate_proj.bias",
    "up_b": "mlp.up_proj.bias",
    "down_b": "mlp.down_proj.bias",
}


@dataclass(frozen=True)
class DecoderSpec:
    """The shape of a Llama/Qwen2 decoder (static under ``jit``)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    num_layers: int
    eps: float
    rope_theta: float

    @classmethod
    def from_config(cls, config: Any, where: str) -> DecoderSpec:
        """From a transformers config. Raises ``ConfigError`` for a model this forward
        does not implement (another family, a RoPE variant, sliding-window layers)."""
        family = str(getattr(config, "model_type", ""))
        if family not in FAMILIES:
            raise ConfigError(
                f"extract.backend=jax runs Llama/Qwen2-family decoders ({', '.join(FAMILIES)}); "
                f"{where} is model_type {family!r}: use extract.backend=torch"
            )
        act = str(getattr(config, "hidden_act", "silu"))
        if act != "silu":
            raise ConfigError(
                f"extract.backend=jax implements the SwiGLU MLP (hidden_act silu); {where} has "
                f"hidden_act {act!r}: use extract.backend=torch"
            )
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"extract.backend=jax implements plain rotary embeddings (rope_type default); "
                f"{where} uses rope_type {rope_type!r}: use extract.backend=torch"
            )
        theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        if theta is None:
            raise ModelError(f"{where}: its config has no rope_theta")
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            raise ConfigError(
                f"extract.backend=jax has no sliding-window attention, which {where} uses "
                "(use_sliding_window): use extract.backend=torch"
            )
        heads = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
        return cls(
            hidden=hidden,
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
            intermediate=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers),
            eps=float(config.rms_norm_eps),
            rope_theta=float(theta),
        )


# ----------------------------------------------------------------------------- forward


def rope_tables(spec: DecoderSpec, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (seq_len, head_dim), fp32, as transformers' default rotary embedding
    computes them (positions 0..seq_len-1: right-padded rows)."""
    dim = spec.head_dim
    inv_freq = 1.0 / (
        spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
    )
    freqs = np.arange(seq_len, dtype=np.float32)[:, None] * inv_freq[None, :].astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def _rms_norm(x, w, eps: float):
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return w * (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _linear(x, w, b=None):
    # Hugging Face layout: w is (out, in); no transpose is materialized.
    y = jnp.einsum("...i,oi->...o", x, w)
    return y if b is None else y + b


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _attention(p: dict, x, cos, sin, allowed, spec: DecoderSpec):
    b, n, _ = x.shape
    groups = spec.heads // spec.kv_heads
    q = _linear(x, p["q_w"], p.get("q_b")).reshape(b, n, spec.heads, spec.head_dim)
    k = _linear(x, p["k_w"], p.get("k_b")).reshape(b, n, spec.kv_heads, spec.head_dim)
    v = _linear(x, p["v_w"], p.get("v_b")).reshape(b, n, spec.kv_heads, spec.head_dim)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    # Query head h reads KV head h // groups (transformers' repeat_kv), without copying K/V.
    q = q.reshape(b, n, spec.kv_heads, groups, spec.head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) * (spec.head_dim**-0.5)
    scores = jnp.where(
        allowed[:, None, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min
    )
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, n, spec.heads * spec.head_dim)
    return _linear(out, p["o_w"], p.get("o_b"))


def _mlp(p: dict, x):
    gate = _linear(x, p["gate_w"], p.get("gate_b"))
    up = _linear(x, p["up_w"], p.get("up_b"))
    return _linear(jax.nn.silu(gate) * up, p["down_w"], p.get("down_b"))


def _block(p: dict, h, cos, sin, allowed, spec: DecoderSpec):
    h = h + _attention(p, _rms_norm(h, p["ln1"], spec.eps), cos, sin, allowed, spec)
    return h + _mlp(p, _rms_norm(h, p["ln2"], spec.eps))


def hidden_states(
    params: dict, input_ids, valid, *, spec: DecoderSpec, layers: tuple[int, ...], out_dtype
) -> tuple:
    """The hidden states ``layers`` (sorted) of a batch, each (batch, seq, hidden) in
    ``out_dtype``: ``input_ids`` (batch, seq) int32, ``valid`` (batch, seq) bool (False:
    padding). Runs the decoder layers up to the last requested one only."""
    n = input_ids.shape[1]
    cos_np, sin_np = rope_tables(spec, n)
    dtype = params["embed"].dtype
    cos, sin = jnp.asarray(cos_np).astype(dtype), jnp.asarray(sin_np).astype(dtype)
    causal = jnp.tril(jnp.ones((n, n), dtype=bool))
    allowed = causal[None] & valid[:, None, :]  # (batch, query, key)
    want = set(layers)
    out: dict[int, Any] = {}
    h = jnp.take(params["embed"], input_ids, axis=0)
    if 0 in want:
        out[0] = h
    for i, p in enumerate(params["layers"]):
        h = _block(p, h, cos, sin, allowed, spec)
        k = i + 1
        if k in want:
            out[k] = _rms_norm(h, params["norm"], spec.eps) if k == spec.num_layers else h
    return tuple(out[k].astype(out_dtype) for k in layers)


# ----------------------------------------------------------------------------- weights


def _bf16_numpy(t) -> np.ndarray:
    """A torch tensor as numpy without a copy through fp32 (bf16 as ml_dtypes.bfloat16)."""
    import ml_dtypes
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


class SafetensorsWeights:
    """Tensors by name from a model directory's ``*.safetensors`` (one file or an index),
    memory-mapped. Raises ``ModelError`` naming the directory when there are none."""

    def __init__(self, d: Path) -> None:
        index = d / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in d.glob("*.safetensors"))
            weight_map = None
        if not files:
            pickles = sorted(p.name for p in d.glob("*.bin"))
            extra = (
                f" (only {', '.join(pickles)}: pickle files, which embedfleet never loads; "
                "re-save the model with save_pretrained(..., safe_serialization=True))"
                if pickles
                else ""
            )
            raise ModelError(
                f"{d}: no *.safetensors weights for extract.backend=jax{extra}; or use "
                "extract.backend=torch"
            )
        from safetensors import safe_open

        self.dir = d
        self._handles = {f: safe_open(str(d / f), framework="pt") for f in files}
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}  # noqa: SIM118
        self._where = weight_map

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> np.ndarray:
        return _bf16_numpy(self._handles[self._where[name]].get_tensor(name))

    def describe(self) -> str:
        return str(self.dir)


class StateDictWeights:
    """Tensors by name from a loaded torch model's state dict (the GGUF path)."""

    def __init__(self, state: dict, where: str) -> None:
        self._state = state
        self._where = where

    def names(self) -> list[str]:
        return list(self._state)

    def get(self, name: str) -> np.ndarray:
        return _bf16_numpy(self._state[name].detach())

    def describe(self) -> str:
        return self._where


def _prefix(names: list[str], where: str) -> str:
    for n in names:
        if n.endswith("embed_tokens.weight"):
            return n[: -len("embed_tokens.weight")]
    raise ModelError(
        f"{where}: no embed_tokens.weight among its tensors; not a Llama/Qwen2 checkpoint"
    )


def load_params(
    weights: SafetensorsWeights | StateDictWeights,
    spec: DecoderSpec,
    last_layer: int,
    *,
    dtype: Any,
    put: Callable[[str, np.ndarray], Any],
) -> dict:
    """The parameters hidden states ``0..last_layer`` need, each passed through
    ``put(key, array)`` (cast to ``dtype`` on the host, then placed on the devices):
    ``{"embed", "layers": [per decoder layer {ln1, q_w, q_b?, ...}], "norm"?}``. Raises
    ``ModelError`` naming a missing tensor or a shape that disagrees with the config."""
    names = weights.names()
    have = set(names)
    pre = _prefix(names, weights.describe())

    def one(key: str, name: str, shape: tuple[int | None, ...]) -> Any:
        full = pre + name
        if full not in have:
            raise ModelError(f"{weights.describe()}: tensor {full} is missing")
        a = weights.get(full)
        if len(a.shape) != len(shape) or any(
            w not in (None, g) for g, w in zip(a.shape, shape, strict=False)
        ):
            raise ModelError(
                f"{weights.describe()}: tensor {full} has shape {tuple(a.shape)}, the config "
                f"says {shape}"
            )
        return put(key, a.astype(dtype, copy=False))

    s = spec
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    shapes = {
        "ln1": (s.hidden,),
        "q_w": (q, s.hidden),
        "k_w": (kv, s.hidden),
        "v_w": (kv, s.hidden),
        "o_w": (s.hidden, q),
        "ln2": (s.hidden,),
        "gate_w": (s.intermediate, s.hidden),
        "up_w": (s.intermediate, s.hidden),
        "down_w": (s.hidden, s.intermediate),
        "q_b": (q,),
        "k_b": (kv,),
        "v_b": (kv,),
        "o_b": (s.hidden,),
        "gate_b": (s.intermediate,),
        "up_b": (s.intermediate,),
        "down_b": (s.hidden,),
    }
    params: dict[str, Any] = {"embed": one("embed", "embed_tokens.weight", (None, s.hidden))}
    blocks = []
    for i in range(min(last_layer, s.num_layers)):
        p = {k: one(k, f"layers.{i}.{n}", shapes[k]) for k, n in LAYER_WEIGHTS.items()}
        for k, n in LAYER_BIASES.items():
            if pre + f"layers.{i}.{n}" in have:
                p[k] = one(k, f"layers.{i}.{n}", shapes[k])
        blocks.append(p)
    params["layers"] = blocks
    if last_layer == s.num_layers:
        params["norm"] = one("norm", "norm.weight", (s.hidden,))
    return params
