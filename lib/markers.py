"""Completion markers: the file-based truth of which tasks are done (DESIGN.md contract 2).

A marker is JSON written atomically *after* every output of the task has been published.
It names the outputs with their sizes and sha256, the row range, counts and the config
hash of the stage. Layout: ``<run_dir>/<stage dir>/completions/task_<index:05d>.json``.

A marker is *valid* when it parses, its config hash equals the run's, and every output it
names exists with the recorded size. A marker with another config hash is an error
(``ConfigMismatchError``), not a skip: the run dir belongs to a different configuration.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lib.errors import EmbedfleetError
from lib.fsio import atomic_write_json, sha256_file


class ConfigMismatchError(EmbedfleetError):
    """A marker was written under a different configuration than the current run's."""


class InvalidMarkerError(EmbedfleetError):
    """A marker exists but is unreadable or its outputs are missing or changed."""


@dataclass
class OutputFile:
    path: str  # relative to the run dir
    bytes: int
    sha256: str


@dataclass
class CompletionMarker:
    stage: str
    task: int
    num_tasks: int
    config_hash: str
    row_range: list[int] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    outputs: list[OutputFile] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    host: str = field(default_factory=socket.gethostname)
    finished_at: float = field(default_factory=time.time)
    wall_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CompletionMarker:
        data = dict(data)
        data["outputs"] = [OutputFile(**o) for o in data.get("outputs", [])]
        return cls(**data)


def completions_dir(run_dir: Path, stage_dir: str) -> Path:
    return Path(run_dir) / stage_dir / "completions"


def marker_path(run_dir: Path, stage_dir: str, task: int) -> Path:
    return completions_dir(run_dir, stage_dir) / f"task_{task:05d}.json"


def describe_outputs(
    run_dir: Path, paths: Iterable[Path], known: dict[str, str] | None = None
) -> list[OutputFile]:
    """Size and sha256 of each published output, paths stored relative to ``run_dir``.

    ``known`` maps file names to digests already computed while writing (big files are
    not read again).
    """
    run_dir = Path(run_dir)
    known = known or {}
    out = []
    for p in paths:
        p = Path(p)
        digest = known.get(p.name) or sha256_file(p)
        out.append(OutputFile(str(p.relative_to(run_dir)), p.stat().st_size, digest))
    return out


def write_marker(run_dir: Path, stage_dir: str, marker: CompletionMarker) -> Path:
    path = marker_path(run_dir, stage_dir, marker.task)
    atomic_write_json(path, marker.to_json())
    return path


def read_marker(path: Path) -> CompletionMarker:
    try:
        return CompletionMarker.from_json(json.loads(Path(path).read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidMarkerError(f"{path}: unreadable completion marker ({exc})") from exc


def check_marker(
    run_dir: Path, stage_dir: str, task: int, config_hash: str, *, verify_sha256: bool = False
) -> CompletionMarker | None:
    """Return the task's marker if it is valid, ``None`` if absent or stale.

    Raises ``ConfigMismatchError`` when the marker belongs to another configuration.
    A marker whose outputs are missing or changed is treated as absent (the task is redone).
    """
    path = marker_path(run_dir, stage_dir, task)
    if not path.exists():
        return None
    try:
        marker = read_marker(path)
    except InvalidMarkerError:
        return None
    if marker.config_hash != config_hash:
        raise ConfigMismatchError(
            f"{path} was written with config hash {marker.config_hash[:12]}, but this run's "
            f"{stage_dir} config hashes to {config_hash[:12]}: the run dir {run_dir} belongs to a "
            "different configuration. Use a new run name (run.name=...), or delete "
            f"{Path(run_dir) / stage_dir} (and the stages after it) to redo that stage."
        )
    for out in marker.outputs:
        f = Path(run_dir) / out.path
        if not f.exists() or f.stat().st_size != out.bytes:
            return None
        if verify_sha256 and sha256_file(f) != out.sha256:
            return None
    return marker


def verify_outputs(run_dir: Path, marker: CompletionMarker) -> list[str]:
    """Problems with a marker's outputs (missing, size or sha256 changed); empty if none."""
    problems = []
    for out in marker.outputs:
        f = Path(run_dir) / out.path
        if not f.exists():
            problems.append(f"{f} is missing")
        elif f.stat().st_size != out.bytes:
            problems.append(
                f"{f} has {f.stat().st_size} bytes, marker says {out.bytes} (truncated?)"
            )
        elif sha256_file(f) != out.sha256:
            problems.append(f"{f} sha256 differs from its marker (modified or corrupt)")
    return problems
