"""Size-capped shards written by a thread beside the forward passes.

The task hands each batch's arrays to ``ShardWriter.put`` (a bounded queue: compute never
runs more than ``queue_batches`` ahead of compression and upload). The thread appends
them to the open shard (``ShardBuilder``), and when its compressed bytes reach the cap it
publishes the shard under its final name (``Storage.publish``: a temporary renamed on a
POSIX path, an upload under the final name on an object store), then the shard's
checkpoint marker, create-only, after it. A listing therefore never shows a marker for a
shard that is not whole; a task killed anywhere resumes after its last marked shard.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lib.core.markers import CompletionMarker, discard_marker, write_marker
from lib.core.storage import Storage
from lib.extract.shardfile import ShardBuilder

log = logging.getLogger(__name__)

_DONE = object()


@dataclass
class BatchArrays:
    arrays: dict[str, np.ndarray]
    samples: int
    tokens: int
    first: int  # position of the batch's first sample in the task's sequence
    sample_ids: tuple[int, int]  # first and last sample id


@dataclass
class ShardRecord:
    """What the task's metadata.json says about one shard."""

    name: str
    bytes: int
    sha256: str
    samples: int
    tokens: int
    positions: list[int]  # [first, stop) in the task's sample sequence
    sample_ids: list[int]  # first and last sample id
    frames: dict[str, list[Any]]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_marker(cls, m: CompletionMarker) -> ShardRecord:
        out = m.outputs[0]
        return cls(
            out.path,
            out.bytes,
            out.sha256,
            int(m.counts["samples"]),
            int(m.counts["tokens"]),
            list(m.row_range or [0, 0]),
            list(m.extra["sample_ids"]),
            dict(m.extra["frames"]),
        )


@dataclass
class WriterStats:
    shards: int = 0
    bytes: int = 0
    write_seconds: float = 0.0
    records: list[ShardRecord] = field(default_factory=list)


class ShardWriter:
    """Writes shards ``first_shard, first_shard + 1, ...`` of one task.

    ``new_builder()`` makes an empty shard; ``names(i)`` gives shard ``i``'s file and
    marker names; ``marker(i, builder, positions, ids, output, frames)`` the marker."""

    def __init__(
        self,
        storage: Storage,
        *,
        cap_bytes: int,
        first_shard: int,
        new_builder: Callable[[], ShardBuilder],
        names: Callable[[int], tuple[str, str]],
        make_marker: Callable[..., CompletionMarker],
        queue_batches: int,
        on_shard: Callable[[ShardRecord], None] | None = None,
    ) -> None:
        self.storage = storage
        self.cap = cap_bytes
        self.next_shard = first_shard
        self.new_builder = new_builder
        self.names = names
        self.make_marker = make_marker
        self.on_shard = on_shard
        self.stats = WriterStats()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_batches)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="extract-writer", daemon=True)
        self._builder: ShardBuilder | None = None
        self._first = 0
        self._ids: list[int] = []
        self._thread.start()

    def put(self, batch: BatchArrays) -> None:
        """Queue one batch (blocks while the queue is full); raises the writer's error."""
        while True:
            self._raise()
            try:
                self._queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> WriterStats:
        """Write the last (partial) shard, wait for the thread; raises its error."""
        self.put(_DONE)  # type: ignore[arg-type]
        self._thread.join()
        self._raise()
        return self.stats

    def abort(self) -> None:
        """Stop the thread without writing the open shard (its samples are redone)."""
        self._error = self._error or RuntimeError("aborted")
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_DONE)

    def _raise(self) -> None:
        if self._error is not None and not isinstance(self._error, _Aborted):
            err, self._error = self._error, _Aborted()
            raise err

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    if self._error is None and self._builder is not None:
                        self._flush()
                    return
                if self._error is not None:
                    continue
                self._add(item)
        except BaseException as exc:  # handed to the task's thread
            self._error = exc

    def _add(self, batch: BatchArrays) -> None:
        if self._builder is None:
            self._builder = self.new_builder()
            self._first = batch.first
            self._ids = [batch.sample_ids[0], batch.sample_ids[1]]
        self._builder.add(batch.arrays, batch.samples, batch.tokens)
        self._ids[1] = batch.sample_ids[1]
        if self._builder.bytes >= self.cap:
            self._flush()

    def _flush(self) -> None:
        b = self._builder
        assert b is not None
        t0 = time.monotonic()
        name, marker_name = self.names(self.next_shard)
        discard_marker(self.storage, marker_name)  # a stale marker of an older attempt
        with self.storage.publish(name, digest=False) as staged:
            with open(staged.path, "wb") as fh:
                sha, size, frames = b.write(fh)
            staged.sha256 = sha
        assert staged.output is not None
        positions = [self._first, self._first + b.samples]
        marker = self.make_marker(self.next_shard, b, positions, self._ids, staged.output, frames)
        write_marker(self.storage, marker_name, marker)
        record = ShardRecord.from_marker(marker)
        self.stats.records.append(record)
        self.stats.shards += 1
        self.stats.bytes += size
        self.stats.write_seconds += time.monotonic() - t0
        self.next_shard += 1
        self._builder = None
        if self.on_shard is not None:
            self.on_shard(record)


class _Aborted(Exception):
    pass
