"""What a stage's parameters mean for its config hash, and plain views of a config.

Each stage's parameters are one dataclass, its Hydra node and its algorithm's input. A
field declared with ``unhashed(...)`` changes speed, placement or logging, never outputs:
it stays out of the stage's config hash (``hashed_values``), so a resumed run may change
it. That field metadata is the one list of output-irrelevant keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lib.core.errors import ConfigError

_HASHED = "embedfleet.hashed"


def unhashed(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING):
    """A dataclass field that is not part of its stage's config hash."""
    kwargs: dict[str, Any] = {"metadata": {_HASHED: False}}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)


def is_hashed(f: dataclasses.Field) -> bool:
    return f.metadata.get(_HASHED, True)


def unhashed_keys(cls: type) -> set[str]:
    """Names of ``cls``'s fields declared ``unhashed``."""
    return {f.name for f in dataclasses.fields(cls) if not is_hashed(f)}


def to_plain(cfg: Any) -> Any:
    """Resolved plain Python containers (enums as their names)."""
    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return to_plain(OmegaConf.structured(cfg))
    return cfg


def hashed_values(cls: type, section: Mapping[str, Any] | DictConfig | Any) -> dict[str, Any]:
    """The plain values of ``section`` (a node of dataclass ``cls``) that determine outputs."""
    plain = to_plain(section)
    return {k: v for k, v in plain.items() if k not in unhashed_keys(cls)}


def to_params(section: DictConfig, cls: type) -> Any:
    """A config node as an instance of its dataclass ``cls`` (the algorithm's input)."""
    if isinstance(section, cls):
        return section
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), section))


def from_mapping(cls: type, mapping: Mapping[str, Any], section: str) -> Any:
    """An instance of the dataclass ``cls`` from a plain mapping (a job's config section,
    a test's dict). Raises ``ConfigError`` naming unknown keys and listing the valid ones."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise ConfigError(f"unknown {section} settings {unknown}; valid ones: {known}")
    return cls(**mapping)
