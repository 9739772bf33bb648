"""Composing ``conf/`` with Hydra, loading a run's ``run.yaml``, and explaining bad keys.

Resolvers: ``ef.dataset_name`` (a short name of a dataset path), ``ef.local_dir`` (where
Hydra keeps a run locally: the run root itself, or a local mirror for an object-store
root such as ``s3://bucket/runs``, since Hydra creates its output dir on a local disk) and
``ef.run_dir`` (the run dir: Hydra's output dir, moved back under an object-store root).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lib.config.redact import redacted_values, restore_env_secrets
from lib.config.schema import SCHEMA_NAME, EmbedfleetConfig
from lib.config.validate import validate_config
from lib.core.errors import ConfigError
from lib.core.paths import RunPaths
from lib.core.repo import CONF_DIR
from lib.core.storage import is_url, join


def dataset_name(path: str) -> str:
    """A short name for a dataset path: ``builtin:x`` -> x, ``/a/b.parquet`` -> b,
    ``org/name`` -> name; a list of files: its first file's."""
    if isinstance(path, ListConfig | list | tuple):
        path = path[0] if len(path) else "dataset"
    p = str(path).removeprefix("builtin:").rstrip("/").split("?")[0]
    stem = p.rsplit("/", 1)[-1]
    for suffix in (".parquet", ".pq", ".jsonl", ".ndjson", ".json", ".csv", ".gz"):
        stem = stem.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "dataset"


def local_dir(root: str) -> str:
    """Where Hydra keeps runs of ``root`` on this machine: ``root`` itself when it is a
    local path, a mirror under the temp dir when it is a URL."""
    if not is_url(root):
        return root
    tag = hashlib.sha1(root.encode()).hexdigest()[:12]
    return str(Path(tempfile.gettempdir()) / "embedfleet-hydra" / tag)


def run_dir(root: str, output_dir: str) -> str:
    """The run dir of Hydra's ``output_dir``: itself for a local root; under ``root`` again
    (same relative name, sweep sub-dirs included) for a URL root."""
    if not is_url(root):
        return output_dir
    rel = os.path.relpath(output_dir, local_dir(root))
    return join(root, *Path(rel).parts)


def register_resolvers() -> None:
    for name, fn in (
        ("ef.dataset_name", dataset_name),
        ("ef.local_dir", local_dir),
        ("ef.run_dir", run_dir),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def register_configs() -> None:
    """Register the root schema in Hydra's ConfigStore and our resolvers (idempotent)."""
    from hydra.core.config_store import ConfigStore

    register_resolvers()
    ConfigStore.instance().store(name=SCHEMA_NAME, node=EmbedfleetConfig)


def compose(overrides: list[str], job_name: str = "launch") -> DictConfig:
    """``conf/config.yaml`` with ``overrides``, outside ``@hydra.main``; ``run.dir`` is
    pinned to ``run.root/run.name`` (Hydra's output dir exists only under its app).
    Raises ``ConfigError`` for what ``validate_config`` refuses."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=job_name):
        cfg = hydra_compose("config", overrides=overrides)
    validate_config(cfg)
    root = str(cfg.run.root)
    cfg.run.dir = join(root if is_url(root) else str(Path(root).expanduser()), str(cfg.run.name))
    return cfg


def load_run_config(paths: RunPaths) -> DictConfig:
    """A run's saved ``run.yaml`` through the schema (typed, validated values)."""
    register_resolvers()
    try:
        text = paths.storage.read_text(paths.run_config)
    except FileNotFoundError:
        raise ConfigError(
            f"{paths.url(paths.run_config)} does not exist: is this a run dir made by launch.py?"
        ) from None
    schema = OmegaConf.structured(EmbedfleetConfig)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.create(text))
    except Exception as exc:  # omegaconf raises several types; all mean the same to a user
        raise ConfigError(f"{paths.url(paths.run_config)}: {exc}") from exc
    # Secrets are not in run.yaml: a task reads cluster.env's from its environment, where
    # the launcher put them; any other redacted value is refused (launch refuses those).
    restore_env_secrets(cfg.cluster.env)
    plain = OmegaConf.to_container(cfg, resolve=False)
    stale = [k for k in redacted_values(plain) if not k.startswith("cluster.env.")]
    if stale:
        raise ConfigError(
            f"{paths.url(paths.run_config)}: {', '.join(stale)} held a secret, which run.yaml "
            "keeps redacted, so no task can use it; relaunch with that secret given through "
            "the environment (cluster.pass_env or cluster.env_file) instead of the config"
        )
    OmegaConf.set_struct(cfg, True)
    return cfg


def valid_keys(path: str) -> list[str]:
    """Valid keys at a dotted path of the schema (``embed`` -> its fields); [] if unknown."""
    node: Any = EmbedfleetConfig
    for part in [p for p in path.split(".") if p]:
        fields = (
            {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        )
        if part not in fields:
            return []
        f = fields[part]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        node = type(default) if dataclasses.is_dataclass(default) else None
        if node is None:
            return []
    return (
        sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []
    )


def _messages(exc: BaseException) -> list[str]:
    out: list[str] = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        msg = str(exc).strip()
        # omegaconf chains a templated copy of its message ('$VALUE'); show it once.
        if msg and msg not in out and "$VALUE" not in msg and not re.fullmatch(r"'[^']*'", msg):
            out.append(msg)
        exc = exc.__cause__ or exc.__context__
    return out


def explain_config_error(exc: BaseException) -> str:
    """The error's messages plus, for an unknown key, the valid keys at that level."""
    text = "\n".join(_messages(exc))
    lines = [f"config error: {text}"]
    m = re.search(r"full_key: ([\w.\[\]]+)", text)
    if m:
        key = m.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        keys = valid_keys(parent)
        if keys and key.rsplit(".", 1)[-1] not in keys:
            where = parent or "the top level"
            lines.append(f"valid keys under {where}: {', '.join(keys)}")
    return "\n".join(lines)
