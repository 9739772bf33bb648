"""What the last sync of a source saw: per file its remote size, mtime and path, the local
size, mtime and sha256, and how it was verified; plus the download in progress (the remote
size and mtime its ``.part`` belongs to).

Rewritten (atomically) after each file, so a task killed mid-run resumes: verified files
are skipped, a ``.part`` is resumed only when it belongs to the same remote version.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from lib.core.storage import Storage


@dataclass
class FileState:
    remote_path: str
    remote_size: int
    remote_mtime: int
    sha256: str
    verification: str  # remote-sha256 | manifest | size-only
    local_mtime_ns: int


@dataclass
class SourceRecord:
    files: dict[str, FileState] = field(default_factory=dict)
    partial: dict[str, list[int]] = field(default_factory=dict)  # rel -> [size, mtime]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> SourceRecord:
        if not isinstance(data, dict):
            return cls()
        try:
            files = {k: FileState(**v) for k, v in (data.get("files") or {}).items()}
            partial = {k: [int(x) for x in v] for k, v in (data.get("partial") or {}).items()}
        except (TypeError, ValueError):
            return cls()  # an unreadable record only costs re-verification
        return cls(files, partial)


class RecordWriter:
    """The record of one source, shared by its download threads."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage, self.name = storage, name
        self.record = SourceRecord.from_json(storage.read_json(name))
        self.previous = SourceRecord.from_json(self.record.to_json())
        self._lock = threading.Lock()

    def start(self, rel: str, size: int, mtime: int) -> bool:
        """Note that ``rel``'s ``.part`` belongs to (size, mtime); True when the ``.part``
        left from before belongs to the same version (it may be resumed)."""
        with self._lock:
            same = self.record.partial.get(rel) == [size, mtime]
            self.record.partial[rel] = [size, mtime]
            self.record.files.pop(rel, None)
            self._save()
            return same

    def done(self, rel: str, state: FileState) -> None:
        with self._lock:
            self.record.partial.pop(rel, None)
            self.record.files[rel] = state
            self._save()

    def _save(self) -> None:
        self.storage.publish_json(self.name, self.record.to_json())
