"""Completion markers: the file-based truth of which tasks are done (DESIGN.md contract 2).

One contract for every stage, and for the checkpoints inside a task (an embed shard's
parts, a k-means level's steps): a marker is JSON published *after* every output it names,
create-only, at ``<stage dir>/completions/task_XXXXX.json`` (a checkpoint's at the place
``lib.core.paths`` names). It records the stage name, the task, the checkpoint (``part``:
``part_00003``, ``step2``; None for the task itself), the outputs with sizes and sha256,
the row range, counts and the stage's config hash.

A marker is *valid* when it parses, its config hash is the stage's, and every output it
names exists with the recorded size (and sha256, when asked). A marker with another config
hash is an error (``ConfigMismatchError``), not a skip: the run dir belongs to another
configuration. A marker whose outputs are missing or changed counts as absent; before a
task (or checkpoint) rewrites the outputs, it removes that stale marker
(``discard_marker``), so no marker ever describes outputs being replaced and the
create-only write at the end succeeds.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lib.core.errors import ConfigMismatchError, InvalidMarkerError
from lib.core.paths import RunPaths
from lib.core.storage import OutputFile, Storage, json_bytes


@dataclass
class CompletionMarker:
    stage: str  # the stage name of the plan: "embed", "kmeans_level1", "metrics_level2"
    task: int
    num_tasks: int
    config_hash: str
    row_range: list[int] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    outputs: list[OutputFile] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    part: str | None = None  # a checkpoint inside the task; None: the task itself
    host: str = field(default_factory=socket.gethostname)
    finished_at: float = field(default_factory=time.time)
    wall_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CompletionMarker:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["outputs"] = [OutputFile(**o) for o in data.get("outputs", [])]
        return cls(**data)


def parse_marker(blob: bytes, where: str) -> CompletionMarker:
    try:
        return CompletionMarker.from_json(json.loads(blob))
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidMarkerError(f"{where}: unreadable completion marker ({exc})") from exc


def read_marker(storage: Storage, name: str) -> CompletionMarker:
    """The marker at ``name`` (``FileNotFoundError`` if absent, ``InvalidMarkerError``)."""
    return parse_marker(storage.read_bytes(name), storage.url(name))


def write_marker(storage: Storage, name: str, marker: CompletionMarker) -> bool:
    """Publish ``marker`` at ``name``, create-only. Returns False if a marker was already
    there (another attempt of the same task finished first); nothing is overwritten."""
    return storage.create(name, json_bytes(marker.to_json()))


def _mismatch(storage: Storage, name: str, found: str, want: str, stage_dir: str) -> Exception:
    run = storage.root
    return ConfigMismatchError(
        f"{storage.url(name)} was written with config hash {found[:12]}, but this run's "
        f"{stage_dir} config hashes to {want[:12]}: the run dir {run} belongs to a different "
        "configuration. Use a new run name (run.name=...), or delete "
        f"{storage.url(stage_dir)} (and the stages after it) to redo that stage."
    )


def outputs_intact(
    storage: Storage,
    marker: CompletionMarker,
    *,
    sizes: dict[str, int] | None = None,
    verify_sha256: bool = False,
) -> bool:
    """Every output of ``marker`` exists with its recorded size (and sha256 if asked).

    ``sizes``: a listing (``storage.list``) covering the outputs, to check without one
    request per file; outputs it does not cover are looked up one by one."""
    for out in marker.outputs:
        size = sizes.get(out.path) if sizes is not None and out.path in sizes else None
        if size is None:
            size = storage.size(out.path)
        if size != out.bytes:
            return False
        if verify_sha256 and storage.sha256(out.path) != out.sha256:
            return False
    return True


def valid_marker(
    storage: Storage,
    name: str,
    config_hash: str | None,
    *,
    stage_dir: str = "",
    sizes: dict[str, int] | None = None,
    blob: bytes | None = None,
    verify_sha256: bool = False,
    on_mismatch: str = "raise",
) -> CompletionMarker | None:
    """The marker at ``name`` if it is valid, ``None`` if absent or stale.

    ``config_hash`` None accepts any hash (a reader that only needs the outputs).
    ``on_mismatch``: ``"raise"`` (``ConfigMismatchError``) or ``"stale"`` (treat it as
    absent: a checkpoint of another configuration is redone). ``blob``: the marker's
    bytes when the caller already read them."""
    if blob is None:
        try:
            blob = storage.read_bytes(name)
        except FileNotFoundError:
            return None
    try:
        marker = parse_marker(blob, storage.url(name))
    except InvalidMarkerError:
        return None
    if config_hash is not None and marker.config_hash != config_hash:
        if on_mismatch == "stale":
            return None
        raise _mismatch(storage, name, marker.config_hash, config_hash, stage_dir or name)
    if not outputs_intact(storage, marker, sizes=sizes, verify_sha256=verify_sha256):
        return None
    return marker


def check_marker(
    paths: RunPaths, stage_dir: str, task: int, config_hash: str, *, verify_sha256: bool = False
) -> CompletionMarker | None:
    """The task's completion marker if valid, ``None`` if absent or stale (see module)."""
    return valid_marker(
        paths.storage,
        paths.marker(stage_dir, task),
        config_hash,
        stage_dir=stage_dir,
        verify_sha256=verify_sha256,
    )


def completed_tasks(paths: RunPaths, stage_dir: str, num_tasks: int, config_hash: str) -> set[int]:
    """Tasks of a stage with a valid marker: one listing of the stage dir and one batched
    read of its markers. Raises ``ConfigMismatchError`` on a marker of another config."""
    storage = paths.storage
    sizes = storage.list(stage_dir)
    names = {paths.marker(stage_dir, t): t for t in range(num_tasks)}
    present = [n for n in names if n in sizes]
    blobs = storage.read_many(present)
    done = set()
    for name, blob in blobs.items():
        marker = valid_marker(
            storage, name, config_hash, stage_dir=stage_dir, sizes=sizes, blob=blob
        )
        if marker is not None:
            done.add(names[name])
    return done


def discard_marker(storage: Storage, name: str) -> None:
    """Remove a stale marker (its outputs changed) so that the task can publish anew."""
    storage.remove(name)
