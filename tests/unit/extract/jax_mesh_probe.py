"""Run by tests/unit/extract/test_jax.py in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before JAX starts: 4 CPU
devices): the JAX backend's hidden states of the samples in IN.npz under the meshes named
on the command line, saved to OUT.npz with how each parameter is sharded; a mesh the
backend refuses is saved as its error message.

    python -m tests.unit.extract.jax_mesh_probe MODEL_DIR IN.npz OUT.npz 1d,,4 2d,2,4 ...

(each mesh: extract.mesh, extract.mesh_model_axis (empty: null), extract.batch_size)
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np


def main(model_dir: str, inp: str, out: str, *meshes: str) -> None:
    import jax

    from lib.core.errors import ConfigError
    from lib.extract.jax_forward import JaxForward
    from lib.extract.model import resolve_model
    from lib.extract.samples import Sample

    data = np.load(inp)
    lengths = data["lengths"]
    batch = [
        Sample(
            i,
            data["ids"][i, :n].astype(np.int32),
            np.zeros(n, np.int64),
            np.arange(n, dtype=np.int32),
        )
        for i, n in enumerate(lengths)
    ]
    saved: dict[str, np.ndarray] = {}
    report: dict[str, object] = {"devices": len(jax.devices())}
    for m in meshes:
        kind, axis, batch_size = m.split(",")
        p = SimpleNamespace(
            device="cpu",
            compute_dtype=None,
            trust_remote_code=False,
            layers=[int(k) for k in data["layers"]],
            dtype="fp32",
            batch_size=int(batch_size),
            max_seq_length=int(data["seq_len"]),
            mesh=kind,
            mesh_model_axis=int(axis) if axis else None,
        )
        try:
            fwd = JaxForward(resolve_model(model_dir), p, 0)
        except ConfigError as exc:
            report[m] = {"error": str(exc)}
            continue
        acts = fwd(batch)
        for k, a in acts.items():
            saved[f"{m}/{k}"] = a
        layer0 = fwd.params["layers"][0]
        report[m] = {
            "mesh": dict(fwd.mesh.shape),
            "shards": {
                key: [list(s.data.shape) for s in arr.addressable_shards]
                for key, arr in layer0.items()
            },
        }
    np.savez(out, **{k.replace("/", "__"): v for k, v in saved.items()})
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
