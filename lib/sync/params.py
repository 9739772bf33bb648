"""The ``sync`` node: which remote sources to pull, how to log in, how much at once.

``sync.sources`` is a list of sources, or a mapping name -> source (the name then comes
from the key). A source::

    name: h1                       # also its directory: sync/h1/
    address: cluster1.example.org  # may come from a credentials_file instead
    port: 22
    username: me                   # may come from a credentials_file instead
    remote_dir: /home/me/shards
    patterns: ["cluster*_gpu*.pkl"] # globs relative to remote_dir; `glob:` for a single one
    # exactly one way to log in:
    key_file: ~/.ssh/id_ed25519 | agent: true | password_env: VARIABLE | credentials_file: PATH
    known_hosts: ~/.ssh/known_hosts

A literal ``password:`` is refused (it would sit in the config and in run.yaml): use
``password_env`` or ``credentials_file``. The stage's config hash covers what decides the
files (name, address, port, username, remote_dir, patterns, dest), never how to log in.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lib.config.fields import to_plain, unhashed
from lib.core.errors import ConfigError

# Directories of the sync stage dir that a source name would collide with.
RESERVED_NAMES = {"completions", "attempts", "logs", "records", "slots"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class SyncParams:
    sources: Any = field(default_factory=list)  # a list of sources or {name: source}
    parallel_files: int = unhashed(4, ge=1)  # files of one source downloaded at once
    parallel_sources: int | None = unhashed(None, ge=1)  # sources at once; null: all
    trust_on_first_use: bool = unhashed(False)  # add unknown host keys (and log it)
    dest: str | None = None  # null: the run dir's sync/; else <dest>/<source>/
    connect_timeout: float = unhashed(15.0, gt=0)
    # Preferred SSH ciphers, first = most preferred; [] = paramiko's order.
    ciphers: list[str] = unhashed(default_factory=list)


@dataclass
class SyncSource:
    """One remote source, checked (``parse_sources``)."""

    name: str
    remote_dir: str
    patterns: list[str]
    address: str | None = None
    port: int = 22
    username: str | None = None
    key_file: str | None = None
    agent: bool = False
    password_env: str | None = None
    credentials_file: str | None = None
    known_hosts: str | None = None

    def identity(self) -> dict[str, Any]:
        """What decides the files this source yields (its part of the config hash)."""
        return {
            "name": self.name,
            "address": self.address,
            "port": self.port,
            "username": self.username,
            "remote_dir": self.remote_dir,
            "patterns": list(self.patterns),
        }


SOURCE_KEYS = sorted({f.name for f in dataclasses.fields(SyncSource)} | {"glob"})


def _source(raw: Any, where: str, name: str | None) -> SyncSource:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping of source settings, got {raw!r}")
    data = dict(raw)
    if "password" in data:
        raise ConfigError(
            f"{where}.password: a password in the config would be written into run.yaml and "
            "every place the config goes; refused. Put it in an environment variable and set "
            f"{where}.password_env=VARIABLE, or in a JSON file only you can read (chmod 600) "
            f"and set {where}.credentials_file=PATH"
        )
    unknown = sorted(set(data) - set(SOURCE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; valid keys: {', '.join(SOURCE_KEYS)}")
    if name is not None:
        if data.get("name") not in (None, name):
            raise ConfigError(f"{where}.name={data['name']!r} differs from its key {name!r}")
        data["name"] = name
    patterns = data.pop("patterns", None) or []
    if isinstance(patterns, str):
        patterns = [patterns]
    glob = data.pop("glob", None)
    if glob:
        patterns = [*patterns, str(glob)]
    data["patterns"] = [str(p) for p in patterns]
    for key in ("name", "remote_dir"):
        if not data.get(key):
            raise ConfigError(f"{where}.{key} is not set")
    source = SyncSource(**data)
    try:
        source.port = int(source.port)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.port must be a port number, got {source.port!r}") from None
    _check(source, where)
    return source


def _check(s: SyncSource, where: str) -> None:
    if not _NAME.match(s.name) or s.name in RESERVED_NAMES:
        raise ConfigError(
            f"{where}.name={s.name!r}: a source name is its directory (sync/<name>/): letters, "
            f"digits, '.', '_' and '-', not one of {sorted(RESERVED_NAMES)}"
        )
    if not s.patterns:
        raise ConfigError(
            f"{where}: no patterns; set patterns: [GLOB, ...] (or glob: GLOB), relative to "
            f"remote_dir, e.g. 'cluster*_gpu*.pkl' or 'shards/shard_*.safetensors'"
        )
    for p in s.patterns:
        if p.startswith("/") or ".." in p.split("/") or not p.strip("/"):
            raise ConfigError(
                f"{where}.patterns: {p!r} must be a glob relative to remote_dir, without '..'"
            )
    if not 1 <= s.port <= 65535:
        raise ConfigError(f"{where}.port must be in 1..65535, got {s.port}")
    if not s.address and not s.credentials_file:
        raise ConfigError(f"{where}.address is not set (nor a credentials_file that names it)")


def parse_sources(raw: Any) -> list[SyncSource]:
    """The sources of ``sync.sources`` (a list or a mapping name -> source), sorted by name
    (task ``i`` syncs the ``i``-th). Raises ``ConfigError`` naming the key and the fix."""
    raw = to_plain(raw)
    if raw is None:
        return []
    if isinstance(raw, Mapping):
        sources = [_source(v, f"sync.sources.{k}", str(k)) for k, v in raw.items()]
    elif isinstance(raw, list):
        sources = [_source(v, f"sync.sources[{i}]", None) for i, v in enumerate(raw)]
    else:
        raise ConfigError(f"sync.sources must be a list or a mapping, got {raw!r}")
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"sync.sources: source names must be unique; repeated: {dupes}")
    return sorted(sources, key=lambda s: s.name)


def source_problems(sync: Any) -> list[str]:
    """What the launch check refuses in a ``sync`` node (a literal password first, with
    its fix), one line each; empty when fine. The password itself is never quoted."""
    if not isinstance(sync, Mapping):
        return []
    try:
        parse_sources(sync.get("sources"))
    except ConfigError as exc:
        return [str(exc)]
    return []
