"""Where the merge finds shards this run did not compute: the directory ``merge.legacy_dir``
names, or the sources the sync stage downloaded.

The sync stage writes each remote source's files under ``sync/<source>/`` of the run dir
(``<sync.dest>/<source>/`` when ``sync.dest`` is set), keeping the remote subdirectories;
its own markers, logs and attempt records sit beside the sources
(``sync/completions/``, ...) and are not sources. Each ``SourceDir`` carries one listing
of its files, so nothing is listed twice.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from lib.core.paths import SYNC_DIR, RunPaths
from lib.core.storage import Storage, open_storage

LEGACY_GLOB = "cluster*_gpu*.pkl"
# What the sync stage dir holds besides the sources (lib.core.paths: markers, attempt
# records, logs, the per-source records and run slots): never a source's name.
STAGE_ENTRIES = frozenset({"completions", "attempts", "logs", "records", "slots"})


@dataclass(frozen=True)
class SourceDir:
    """One directory of shard files: a synced source, or the dir ``merge.legacy_dir`` names.

    ``files``: every file under it (name in ``storage`` -> size), from one listing."""

    name: str | None  # the sync source; None for merge.legacy_dir
    storage: Storage
    prefix: str  # the directory inside ``storage``; "" for its root
    files: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.storage.url(self.prefix)

    @property
    def label(self) -> str:
        """``source a``, or the directory for merge.legacy_dir, for messages."""
        return f"source {self.name}" if self.name else self.url

    def describe(self) -> str:
        """``source a (/runs/x/sync/a)`` or just the directory, for messages."""
        return f"source {self.name} ({self.url})" if self.name else self.url

    def matching(self, pattern: str) -> list[str]:
        """Names of the files (at any depth) whose base name matches ``pattern``, sorted."""
        return sorted(n for n in self.files if fnmatch.fnmatchcase(n.rsplit("/", 1)[-1], pattern))


def sync_root(paths: RunPaths, dest: str | None) -> tuple[Storage, str]:
    """The storage and prefix under which each source has its dir: the run dir's ``sync/``,
    or ``dest`` (``sync.dest``: a local path or an fsspec URL)."""
    if dest:
        return open_storage(dest), ""
    return paths.storage, SYNC_DIR


def sync_sources(paths: RunPaths, dest: str | None = None) -> list[SourceDir]:
    """Every source dir under the sync root (``sync_root``) that holds a file, sorted by
    name; [] when there is none (or no sync root at all)."""
    storage, root = sync_root(paths, dest)
    head = f"{root}/" if root else ""
    grouped: dict[str, dict[str, int]] = {}
    for name, size in storage.list(root).items():
        rest = name[len(head) :] if name.startswith(head) else name
        source, sep, _ = rest.partition("/")
        if not sep or source in STAGE_ENTRIES:
            continue  # a file beside the sources, or the sync stage's own records
        grouped.setdefault(source, {})[name] = size
    return [
        SourceDir(source, storage, f"{head}{source}", files)
        for source, files in sorted(grouped.items())
    ]


def legacy_dir_source(legacy_dir: str) -> SourceDir:
    """The directory ``merge.legacy_dir`` (a local path or an fsspec URL), listed."""
    storage = open_storage(legacy_dir)
    return SourceDir(None, storage, "", storage.list(""))


def sync_root_url(paths: RunPaths, dest: str | None) -> str:
    """Where the sources' dirs are looked for, for messages."""
    storage, root = sync_root(paths, dest)
    return storage.url(root)
