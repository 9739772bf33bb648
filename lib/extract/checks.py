"""What a launch checks of the extract stage before it writes anything: the model is
found and readable and has the requested layers; for the JAX backend, that JAX is
installed, the model is one its forward implements and the mesh keys fit its heads."""

from __future__ import annotations

import importlib.util

from omegaconf import DictConfig

from lib.core.errors import ConfigError
from lib.extract.mesh import check_mesh_config
from lib.extract.model import check_layers, read_config, resolve_model
from lib.extract.params import MESHES


def check_extract_launch(cfg: DictConfig) -> None:
    """Raise ``ModelError`` (model missing or unreadable) or ``ConfigError`` (a backend
    not installed or not able to run the model, a mesh that does not fit its heads, a
    layer out of range naming how many the model has)."""
    p = cfg.extract
    if str(p.mesh) not in MESHES:
        raise ConfigError(f"extract.mesh={p.mesh}: choose one of {', '.join(MESHES)}")
    check_backend(str(p.backend))
    source = resolve_model(str(p.model), p.gguf_file)
    config = read_config(source)
    where = source.describe()
    check_layers(list(p.layers), int(config.num_hidden_layers), where)
    if str(p.backend) == "jax":
        from lib.extract.jax_model import DecoderSpec

        spec = DecoderSpec.from_config(config, where)
        # The device count is the workers', unknown here: checked again by each task.
        check_mesh_config(
            str(p.mesh),
            p.mesh_model_axis,
            heads=spec.heads,
            intermediate=spec.intermediate,
            where=where,
        )


def check_backend(backend: str) -> None:
    """Raise ``ConfigError`` for a backend whose library is not installed here."""
    if backend == "jax" and importlib.util.find_spec("jax") is None:
        raise ConfigError(
            "extract.backend=jax needs JAX, which is not installed in this environment: "
            "make install (pip install '.[jax]'; on a TPU VM also pip install "
            "'jax[tpu]==0.10.2'), or use extract.backend=torch"
        )
