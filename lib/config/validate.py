"""The launch check of a composed config, run before anything is written.

Hydra checks the type of every key and refuses a misspelt one, but a key added with
``+`` (``+embed.bach_size=3``) passes it, and it checks no ranges. ``validate_config``
refuses, each with the key and the rule:

- a key the schema does not have, ``+`` or not (only ``dict`` nodes such as
  ``cluster.env`` take any key), listing the valid keys at that level;
- a ``sync.sources`` entry with an unknown key, a missing one or a literal password
  (``lib.sync.params.source_problems``);
- a number outside its field's range (``bounded``/``unhashed`` metadata of the params
  dataclasses, ``lib.config.fields.out_of_range``);
- a ``run.name`` that would put the run dir outside ``run.root`` or on it;
- a URL (``run.root``, ``dataset.path``, ``merge.legacy_dir``) whose protocol no
  installed fsspec file system serves, listing the ones that are installed.

URLs in messages have their userinfo redacted (``redact_url``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lib.config.fields import field_default, out_of_range
from lib.config.redact import redact_url
from lib.config.schema import EmbedfleetConfig
from lib.core.errors import ConfigError
from lib.sync.params import source_problems

# Keys whose value may be an fsspec URL, read or written through lib.core.storage.
URL_KEYS = ("run.root", "dataset.path", "merge.legacy_dir")
RUN_NAME_RULE = (
    "a run name is a relative path of one or more components (`myrun`, `group/myrun`), "
    "without `.` or `..` components, not empty and not absolute, so the run dir is a "
    "directory of its own under run.root"
)


def unknown_keys(
    values: Mapping[str, Any], cls: type = EmbedfleetConfig, prefix: str = ""
) -> list[str]:
    """One line per key of the plain tree ``values`` that the dataclass ``cls`` (nested
    sections included) does not declare, with the valid keys at its level."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = []
    for key, value in values.items():
        f = fields.get(str(key))
        if f is None:
            where = prefix.rstrip(".") or "the top level"
            problems.append(
                f"unknown key {prefix}{key} (a `+` adds a key only where any key is allowed, "
                f"as under cluster.env); valid keys under {where}: {', '.join(sorted(fields))}"
            )
            continue
        default = field_default(f)
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            problems += unknown_keys(value, type(default), f"{prefix}{key}.")
    return problems


def run_name_problem(name: Any, root: Any) -> str | None:
    """Why ``name`` is not a valid ``run.name`` (see ``RUN_NAME_RULE``), or None."""
    text = "" if name is None else str(name)
    parts = text.split("/")
    if text and not text.startswith("/") and all(p not in ("", ".", "..") for p in parts):
        return None
    return (
        f"run.name={text!r} is refused: {RUN_NAME_RULE} (run.root={redact_url(str(root))}); "
        "to put runs elsewhere, set run.root=/that/dir"
    )


def installed_protocols() -> list[str]:
    """The fsspec protocols this environment serves: registered ones, and the known
    implementations whose package is importable."""
    import fsspec
    from fsspec.registry import known_implementations

    found = set(fsspec.registry)
    for proto, spec in known_implementations.items():
        if importlib.util.find_spec(str(spec["class"]).split(".")[0]) is not None:
            found.add(proto)
    return sorted(found)


def url_problem(key: str, value: Any) -> str | None:
    """Why the URL ``value`` of ``key`` cannot be opened (no fsspec file system for its
    protocol, or its package is missing), or None."""
    text = "" if value is None else str(value)
    if "://" not in text or text.startswith("file://"):
        return None
    import fsspec
    from fsspec.registry import known_implementations

    # A chained URL (simplecache::s3://...) names one protocol per link.
    for link in text.split("::"):
        proto = link.split("://", 1)[0] if "://" in link else link
        if proto in fsspec.registry:
            continue
        if proto not in known_implementations:
            return (
                f"{key}={redact_url(text)}: no fsspec file system serves {proto}://; "
                f"installed protocols: {', '.join(installed_protocols())} (a local path "
                "needs no protocol)"
            )
        module = str(known_implementations[proto]["class"]).split(".")[0]
        if importlib.util.find_spec(module) is None:
            hint = known_implementations[proto].get("err") or f"install {module}"
            return (
                f"{key}={redact_url(text)}: {proto}:// needs a package that is not installed "
                f"({hint}); e.g. pip install 'embedfleet[remote]' for s3:// and gs://"
            )
    return None


def config_problems(cfg: DictConfig) -> list[str]:
    """Everything ``validate_config`` refuses in ``cfg``, one line each."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    problems = unknown_keys(plain)
    problems += out_of_range(EmbedfleetConfig, plain)
    problems += source_problems(plain.get("sync"))
    name = run_name_problem(OmegaConf.select(cfg, "run.name"), OmegaConf.select(cfg, "run.root"))
    if name:
        problems.append(name)
    for key in URL_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        # dataset.path may be a list of files
        for one in value if isinstance(value, ListConfig | list) else [value]:
            problem = url_problem(key, one)
            if problem:
                problems.append(problem)
    return problems


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` listing every problem of the composed ``cfg`` (see module doc)."""
    problems = config_problems(cfg)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
