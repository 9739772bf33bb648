"""What a launch checks of the extract stage before it writes anything: the model is
found and readable and has the requested layers."""

from __future__ import annotations

from omegaconf import DictConfig

from lib.core.errors import ConfigError
from lib.extract.model import check_layers, read_config, resolve_model
from lib.extract.params import MESHES


def check_extract_launch(cfg: DictConfig) -> None:
    """Raise ``ModelError`` (model missing or unreadable) or ``ConfigError`` (a backend
    not available, a layer out of range naming how many the model has)."""
    p = cfg.extract
    if str(p.mesh) not in MESHES:
        raise ConfigError(f"extract.mesh={p.mesh}: choose one of {', '.join(MESHES)}")
    check_backend(str(p.backend))
    source = resolve_model(str(p.model), p.gguf_file)
    config = read_config(source)
    check_layers(list(p.layers), int(config.num_hidden_layers), source.describe())


def check_backend(backend: str) -> None:
    """Raise ``ConfigError`` for a backend this version cannot run."""
    if backend != "torch":
        raise ConfigError(
            f"extract.backend={backend} is not available yet; use extract.backend=torch "
            "(the JAX backend for TPUs is still open in issue 18)"
        )
