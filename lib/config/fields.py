"""What a stage's parameters mean for its config hash, and plain views of a config.

Each stage's parameters are one dataclass, its Hydra node and its algorithm's input. A
field declared with ``unhashed(...)`` changes speed, placement or logging, never outputs:
it stays out of the stage's config hash (``hashed_values``), so a resumed run may change
it. That field metadata is the one list of output-irrelevant keys.

A field declared with ``bounded(..., ge=1)`` (or ``unhashed(..., ge=1)``) has a valid
range, kept beside its default: ``out_of_range`` checks every bounded field of a composed
config at launch (``lib.config.validate``), before anything is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lib.core.errors import ConfigError

_HASHED = "embedfleet.hashed"
_BOUNDS = "embedfleet.bounds"


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The valid range of a numeric field (each element of a list field); None (an
    optional field's "auto") is always valid."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def describe(self) -> str:
        limits = ((">=", self.ge), (">", self.gt), ("<=", self.le))
        return " and ".join(f"{op} {v:g}" for op, v in limits if v is not None)

    def holds(self, value: float) -> bool:
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
        )


def bounded(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    hashed: bool = True,
    default_factory: Any = dataclasses.MISSING,
):
    """A dataclass field with a valid range, checked at launch (``out_of_range``)."""
    metadata: dict[str, Any] = {}
    if not hashed:
        metadata[_HASHED] = False
    if (ge, gt, le) != (None, None, None):
        metadata[_BOUNDS] = Bounds(ge, gt, le)
    kwargs: dict[str, Any] = {"metadata": metadata}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)


def unhashed(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    default_factory: Any = dataclasses.MISSING,
):
    """A dataclass field that is not part of its stage's config hash (optionally bounded)."""
    return bounded(default, ge=ge, gt=gt, le=le, hashed=False, default_factory=default_factory)


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (its factory called)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def out_of_range(cls: type, values: Mapping[str, Any] | Any, prefix: str = "") -> list[str]:
    """One line per value of ``values`` (a plain mapping, a config node or an instance of
    the dataclass ``cls``, nested sections included) outside its field's ``Bounds``:
    ``embed.batch_size must be >= 1, got 0``. Values that are not numbers (an unresolved
    interpolation) are left to the type check."""
    if isinstance(values, DictConfig) or not isinstance(values, Mapping):
        values = OmegaConf.to_container(
            values if isinstance(values, DictConfig) else OmegaConf.structured(values),
            resolve=False,
        )
    problems: list[str] = []
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, key = values[f.name], f"{prefix}{f.name}"
        default = field_default(f)
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            problems += out_of_range(type(default), value, f"{key}.")
            continue
        bounds = f.metadata.get(_BOUNDS)
        if bounds is None:
            continue
        items = (
            [(f"{key}[{i}]", v) for i, v in enumerate(value)]
            if isinstance(value, list | tuple)
            else [(key, value)]
        )
        for name, v in items:
            number = isinstance(v, int | float) and not isinstance(v, bool)
            if number and not bounds.holds(v):
                problems.append(f"{name} must be {bounds.describe()}, got {v!r}")
    return problems


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
