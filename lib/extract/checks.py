"""What a launch checks of the extract stage before it writes anything: the model is
found and readable and has the requested layers."""

from __future__ import annotations

from omegaconf import DictConfig

from lib.extract.model import check_layers, read_config, resolve_model


def check_extract_launch(cfg: DictConfig) -> None:
    """Raise ``ModelError`` (model missing or unreadable) or ``ConfigError`` (a layer out
    of range, naming how many the model has)."""
    p = cfg.extract
    source = resolve_model(str(p.model), p.gguf_file)
    config = read_config(source)
    check_layers(list(p.layers), int(config.num_hidden_layers), source.describe())
