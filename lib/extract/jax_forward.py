"""The extract stage's ``jax`` backend: the decoder of ``lib.extract.jax_model`` compiled
once with fixed shapes (``batch_size`` x ``max_seq_length``: every batch, the last one
too, is padded to them, so nothing recompiles), its parameters sharded with
``jax.sharding`` over a ``Mesh`` of the local devices (``lib.extract.mesh``).

Each machine is independent: the mesh spans only its local devices, no collective
crosses hosts. The embedding table and the norms are replicated; q/k/v projections and
the MLP's gate/up are split by output rows (whole heads, MLP columns) over the model
axis, o_proj and down_proj by input columns; the batch is split over the data axis.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from lib.core.errors import ConfigError
from lib.extract import model as torch_model
from lib.extract.mesh import DATA, MODEL, MeshLayout, mesh_layout
from lib.extract.model import ModelSource, check_layers, read_config

log = logging.getLogger(__name__)

_MODEL_ROWS = {"q_w", "gate_w", "up_w"}  # (out, in): split the out rows
_MODEL_COLS = {"o_w", "down_w"}  # (out, in): split the in columns
_MODEL_VEC = {"q_b", "gate_b", "up_b"}
_KV_ROWS, _KV_VEC = {"k_w", "v_w"}, {"k_b", "v_b"}


def partition(key: str, layout: MeshLayout):
    """The ``PartitionSpec`` of parameter ``key`` (a name of ``jax_model.load_params``)."""
    from jax.sharding import PartitionSpec as P

    if key in _MODEL_ROWS or (layout.shard_kv and key in _KV_ROWS):
        return P(MODEL, None)
    if key in _MODEL_VEC or (layout.shard_kv and key in _KV_VEC):
        return P(MODEL)
    if key in _MODEL_COLS:
        return P(None, MODEL)
    return P()


def local_devices(setting: str) -> list:
    """The local JAX devices ``extract.device`` names (auto: JAX's default platform).
    Raises ``ConfigError`` when that platform has none."""
    import jax

    if setting == "auto":
        return jax.local_devices()
    platform = {"cpu": "cpu", "cuda": "gpu"}.get(setting)
    if platform is None:
        raise ConfigError(f"extract.device={setting}: choose auto, cpu or cuda")
    try:
        return jax.local_devices(backend=platform)
    except RuntimeError as exc:
        raise ConfigError(
            f"extract.device={setting} but JAX has no {platform} device here "
            f"({jax.default_backend()} only); use extract.device=auto"
        ) from exc


_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def np_dtype(name: str):
    if name == "bf16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return _NP_DTYPES[name]


class JaxForward:
    """``__call__(batch)``: {layer: (tokens, hidden)} of the batch's non-padding tokens,
    samples one after another, in the stored dtype (bf16 as its bits), as
    ``lib.extract.model.TorchForward`` returns them."""

    name = "jax"

    def __init__(self, source: ModelSource, p: Any, pad_id: int) -> None:
        import jax
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        from lib.extract.jax_model import (
            DecoderSpec,
            SafetensorsWeights,
            StateDictWeights,
            hidden_states,
            load_params,
        )

        where = source.describe()
        devices = local_devices(str(p.device))
        platform = devices[0].platform
        self.compute_dtype = str(p.compute_dtype or ("fp32" if platform == "cpu" else "bf16"))
        self.oom_halvings: list[dict[str, int]] = []  # the torch backend's; none here
        torch_lm = None
        if source.gguf_file:
            # GGUF: transformers dequantizes it; its state dict is the checkpoint.
            torch_lm = torch_model.load_model(
                source, device="cpu", dtype="fp32", trust_remote_code=bool(p.trust_remote_code)
            )
            config = torch_lm.config
        else:
            config = read_config(source)
        self.layers = check_layers(list(p.layers), int(config.num_hidden_layers), where)
        spec = DecoderSpec.from_config(config, where)
        self.hidden_size = spec.hidden
        self.batch_size, self.seq_len = int(p.batch_size), int(p.max_seq_length)
        self.layout = mesh_layout(
            str(p.mesh),
            p.mesh_model_axis,
            len(devices),
            heads=spec.heads,
            kv_heads=spec.kv_heads,
            intermediate=spec.intermediate,
            batch_size=self.batch_size,
            where=where,
        )
        self.mesh = Mesh(
            np.asarray(devices, dtype=object).reshape(self.layout.data, self.layout.model),
            (DATA, MODEL),
        )
        weights = (
            StateDictWeights(torch_lm.state_dict(), where)
            if torch_lm is not None
            else SafetensorsWeights(source.dir)
        )

        def put(key: str, a: np.ndarray):
            return jax.device_put(a, NamedSharding(self.mesh, partition(key, self.layout)))

        self.params = load_params(
            weights, spec, max(self.layers), dtype=np_dtype(self.compute_dtype), put=put
        )
        del weights, torch_lm
        self.store_dtype = str(p.dtype)
        self._batch_sharding = NamedSharding(self.mesh, P(DATA, None))
        self.pad_id = int(pad_id)
        self._fn = jax.jit(
            functools.partial(
                hidden_states,
                spec=spec,
                layers=tuple(self.layers),
                out_dtype=np_dtype(self.store_dtype),
            )
        )
        log.info(
            "jax backend: %d %s device(s), mesh data %d x model %d%s, %s, %d x %d tokens per batch",
            len(devices),
            platform,
            self.layout.data,
            self.layout.model,
            "" if self.layout.shard_kv or self.layout.model == 1 else " (KV heads replicated)",
            self.compute_dtype,
            self.batch_size,
            self.seq_len,
        )

    def _inputs(self, batch: list) -> tuple[np.ndarray, np.ndarray]:
        if len(batch) > self.batch_size:
            raise ValueError(
                f"a batch of {len(batch)} samples; the compiled batch is {self.batch_size}"
            )
        ids = np.full((self.batch_size, self.seq_len), self.pad_id, dtype=np.int32)
        valid = np.zeros((self.batch_size, self.seq_len), dtype=bool)
        for i, s in enumerate(batch):
            n = len(s.token_ids)
            if n > self.seq_len:
                raise ValueError(f"sample {s.sample_id} has {n} tokens > {self.seq_len}")
            ids[i, :n] = s.token_ids
            valid[i, :n] = True
        return ids, valid

    def __call__(self, batch: list) -> dict[int, np.ndarray]:
        import jax

        ids, valid = self._inputs(batch)
        outs = self._fn(
            self.params,
            jax.device_put(ids, self._batch_sharding),
            jax.device_put(valid, self._batch_sharding),
        )
        result = {}
        for k, out in zip(self.layers, outs, strict=True):
            host = np.asarray(out)[valid]
            result[k] = host.view(np.uint16) if self.store_dtype == "bf16" else host
        return result

    def close(self) -> None:
        self.params = None
