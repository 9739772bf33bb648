"""Completion markers: the file-based truth of which tasks are done (DESIGN.md contract 2).

One contract for every stage, and for the checkpoints inside a task (an embed shard's
parts, a k-means level's steps): a marker is JSON published *after* every output it names,
create-only, at ``<stage dir>/completions/task_XXXXX.json`` (a checkpoint's at the place
``lib.core.paths`` names). It records the stage name, the task, the checkpoint (``part``:
``part_00003``, ``step2``; None for the task itself), the outputs with sizes and sha256,
the row range, counts and the stage's config hash, and what the writing process had used
by then (peak RSS, its children's, peak CUDA memory, CPU seconds: ``lib.core.usage``,
filled in by ``write_marker`` for every stage; markers written before these fields
existed parse with them None) and the checkpoint markers the task published
(``checkpoints``: a k-means level's steps; empty when absent).

A marker is *valid* when it parses, its config hash is the stage's, and every output it
names exists with the recorded size (and sha256, when asked). A marker with another config
hash is an error (``ConfigMismatchError``), not a skip: the run dir belongs to another
configuration. A marker whose outputs are missing or changed counts as absent; before a
task (or checkpoint) rewrites the outputs, it removes that stale marker
(``discard_marker``), so no marker ever describes outputs being replaced and the
create-only write at the end succeeds.

A consumer that finds an output that no longer matches its marker (missing, another size,
another sha256: corrupted in place) *invalidates* the marker (``reject_marker``): it is
moved aside with the reason (``RunPaths.invalid_marker``), so the next launch, ``retry``
or a task started by hand redoes that task instead of trusting it, and the message says
so. ``output_problems`` is the one check every consumer and ``launch.py verify`` use.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lib.core.errors import ConfigMismatchError, InvalidMarkerError
from lib.core.hashing import CHUNK_BYTES
from lib.core.paths import RunPaths
from lib.core.storage import OutputFile, Storage, json_bytes
from lib.core.usage import current_usage


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
    # Run-dir names of the checkpoint markers the task published (a k-means level's
    # steps), each naming its own outputs: what a copy of the task's files (storage=sync's
    # pull) brings besides ``outputs``. Empty for a checkpoint and for most stages.
    checkpoints: list[str] = field(default_factory=list)
    host: str = field(default_factory=socket.gethostname)
    finished_at: float = field(default_factory=time.time)
    wall_seconds: float | None = None
    # The writing process's usage until the marker was written (write_marker fills them).
    peak_rss_bytes: int | None = None
    peak_rss_children_bytes: int | None = None
    peak_cuda_bytes: int | None = None
    cpu_seconds: float | None = None

    def record_usage(self) -> None:
        """Fill the usage fields from this process (``lib.core.usage``) unless set."""
        if self.peak_rss_bytes is not None:
            return
        usage = current_usage()
        self.peak_rss_bytes = usage.peak_rss_bytes
        self.peak_rss_children_bytes = usage.peak_rss_children_bytes
        self.peak_cuda_bytes = usage.peak_cuda_bytes
        self.cpu_seconds = usage.cpu_seconds

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
    there (another attempt of the same task finished first); nothing is overwritten. The
    marker records this process's peak memory and CPU time (``record_usage``)."""
    marker.record_usage()
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


def _sha256(storage: Storage, name: str, on_bytes: Callable[[int], None] | None) -> str:
    digest = hashlib.sha256()
    with storage.open(name) as fh:
        while block := fh.read(CHUNK_BYTES):
            digest.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return digest.hexdigest()


def output_problems(
    storage: Storage,
    marker: CompletionMarker,
    *,
    sizes: dict[str, int] | None = None,
    verify_sha256: bool = True,
    only: Collection[str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """What no longer matches between ``marker`` and its outputs: {output: problem}
    (missing, another size, another sha256); empty when all match.

    ``sizes``: a listing covering the outputs (``storage.list``); ``only``: check just
    these outputs (what the caller reads); ``on_bytes(n)``: called as bytes are hashed."""
    problems = {}
    for out in marker.outputs:
        if only is not None and out.path not in only:
            continue
        url = storage.url(out.path)
        size = sizes.get(out.path) if sizes is not None else None
        if size is None:
            size = storage.size(out.path)
        if size is None:
            problems[out.path] = f"{url} is missing"
        elif size != out.bytes:
            problems[out.path] = (
                f"{url} has {size} bytes but its marker recorded {out.bytes} (truncated or "
                "modified)"
            )
        elif verify_sha256 and out.sha256:
            found = _sha256(storage, out.path, on_bytes)
            if found != out.sha256:
                problems[out.path] = (
                    f"{url}: sha256 {found[:12]}... differs from the {out.sha256[:12]}... its "
                    "marker recorded (modified or corrupted in place)"
                )
    return problems


def invalidate_marker(storage: Storage, name: str, reason: str) -> str | None:
    """Move the marker at ``name`` aside (``RunPaths.invalid_marker``) with ``reason``, so
    that its task or checkpoint is redone. Returns where it went; None if no marker was
    there (another reader moved it first)."""
    try:
        blob = storage.read_bytes(name)
    except FileNotFoundError:
        return None
    try:
        original: Any = json.loads(blob)
    except ValueError:
        original = blob.decode(errors="replace")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{uuid.uuid4().hex[:6]}"
    aside = RunPaths.invalid_marker(name, stamp)
    record = {
        "marker": name,
        "reason": reason,
        "invalidated_at": time.time(),
        "host": socket.gethostname(),
        "content": original,
    }
    storage.publish_json(aside, record)  # the record first: the reason is never lost
    storage.remove(name)
    return aside


def _checkpoints_naming(storage: Storage, name: str, bad: Collection[str]) -> list[str]:
    """Checkpoint markers beside the task marker ``name`` that name one of ``bad`` (a
    k-means level marker repeats its final step's outputs): they must go too, or the
    redone task would trust the step and publish the broken file again."""
    stage_dir = name.rsplit("/completions/", 1)[0]
    if stage_dir == name or not bad:
        return []
    task_marker = re.compile(rf"{re.escape(stage_dir)}/completions/task_\d+\.json")
    found = []
    listing = [n for n in storage.list(stage_dir) if RunPaths.is_marker(n)]
    for other in listing:
        if other == name or task_marker.fullmatch(other):
            continue
        try:
            marker = read_marker(storage, other)
        except (FileNotFoundError, InvalidMarkerError):
            continue
        if any(o.path in bad for o in marker.outputs):
            found.append(other)
    return found


def what_to_redo(marker: CompletionMarker | None, name: str) -> str:
    """``task 0 of embed`` / ``part_00003 of embed task 0``, for messages."""
    if marker is None:
        return f"the task of {name}"
    task = f"task {marker.task} of {marker.stage}"
    return f"{marker.part} of {marker.stage} task {marker.task}" if marker.part else task


def reject_marker(
    storage: Storage, name: str, marker: CompletionMarker | None, problems: dict[str, str]
) -> str:
    """Invalidate the marker at ``name`` because of ``problems`` (``output_problems``),
    and any checkpoint marker of its task naming the same files; return the message that
    says what is wrong, that the marker was invalidated, and what to do."""
    reason = "; ".join(problems.values())
    for other in _checkpoints_naming(storage, name, problems):
        invalidate_marker(storage, other, f"{reason} (named by {storage.url(name)} too)")
    aside = invalidate_marker(storage, name, reason)
    where = f"moved to {storage.url(aside)}" if aside else "already moved aside"
    return (
        f"{reason}: marker invalidated; rerun the same command to redo "
        f"{what_to_redo(marker, name)} ({storage.url(name)} {where}, with the reason)"
    )


def require_intact(
    storage: Storage,
    name: str,
    *,
    only: Collection[str] | None = None,
    verify_sha256: bool = True,
) -> CompletionMarker | None:
    """The marker at ``name`` (None when absent: the caller's own checks say what is
    missing), after checking, sha256 too, the outputs a consumer reads (``only``; default
    all). Raises ``InvalidMarkerError``, having invalidated the marker, when one of them no
    longer matches it or the marker is unreadable."""
    try:
        marker = read_marker(storage, name)
    except FileNotFoundError:
        return None
    except InvalidMarkerError as exc:
        raise InvalidMarkerError(reject_marker(storage, name, None, {name: str(exc)})) from None
    problems = output_problems(storage, marker, verify_sha256=verify_sha256, only=only)
    if problems:
        raise InvalidMarkerError(reject_marker(storage, name, marker, problems))
    return marker
