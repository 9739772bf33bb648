"""The sync task of one source: list, decide, download in parallel, verify, record.

Task ``i`` syncs the ``i``-th source of ``sync.sources`` (sorted by name). Files land at
``sync/<source>/<path under remote_dir>`` of the run dir, or ``<sync.dest>/<source>/...``.
A file is skipped when the record of the last sync (``lib.sync.record``) says it was
verified at the remote size and mtime seen now and the local copy is unchanged; else it
is downloaded (resuming a ``.part`` of the same remote version), checked for size,
verified (``lib.sync.verify``), then published. Files the record knew but the host no
longer has are reported, never deleted here.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lib.config.fields import to_params
from lib.config.redact import mask
from lib.core.errors import ConfigError, EmbedfleetError
from lib.core.hashing import sha256_file
from lib.core.markers import CompletionMarker, invalidate_marker, write_marker
from lib.core.paths import MERGE_DIR, MERGE_STAGE, RunPaths
from lib.core.progress import Progress
from lib.core.storage import OutputFile
from lib.plan.spec import StageSpec
from lib.remote.credentials import Login, resolve_login
from lib.remote.errors import RemoteError
from lib.remote.ssh import Connection, Host, connect
from lib.runtime import stop
from lib.runtime.context import TaskContext
from lib.sync.listing import RemoteFile, list_matches
from lib.sync.params import SyncParams, SyncSource, parse_sources
from lib.sync.plan import feeds_merge
from lib.sync.record import FileState, RecordWriter
from lib.sync.slots import slot
from lib.sync.transfer import download, part_path, publish
from lib.sync.verify import SIZE_ONLY, Verifier

log = logging.getLogger(__name__)

TOFU_HINT = " (or set sync.trust_on_first_use=true to add it on the first connection)"


class SyncError(RemoteError):
    """A file could not be synced as it should (changed meanwhile, failed verification)."""


@dataclass
class Outcome:
    """What happened to the files of one source."""

    files: dict[str, FileState] = field(default_factory=dict)
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    transferred: int = 0
    resumed: dict[str, int] = field(default_factory=dict)  # rel -> byte it resumed from
    previous: dict[str, FileState] = field(default_factory=dict)  # the last sync's record


def dest_dir(paths: RunPaths, params: SyncParams, source: SyncSource) -> Path:
    """The local directory of ``source``'s files. Raises ``ConfigError`` for a run dir
    on an object store without ``sync.dest``."""
    if params.dest:
        return Path(os.path.expanduser(params.dest)).absolute() / source.name
    if not getattr(paths.storage, "is_local", False):
        raise ConfigError(
            f"sync writes plain files, but the run dir {paths.root} is on an object store: "
            "set sync.dest=/a/local/or/shared/dir"
        )
    return paths.storage.local_file(paths.sync_source(source.name))


def host_of(source: SyncSource, params: SyncParams, login: Login) -> Host:
    port = source.port if source.port != 22 or not login.port else login.port
    address = source.address or login.address
    if not address:
        raise ConfigError(f"sync.sources {source.name}: no address (config or credentials file)")
    return Host(
        address=address,
        port=port,
        label=f"sync source {source.name}",
        known_hosts=source.known_hosts,
        trust_on_first_use=bool(params.trust_on_first_use),
        connect_timeout=float(params.connect_timeout),
        ciphers=tuple(params.ciphers or ()),
        tofu_hint=TOFU_HINT,
    )


def _unchanged(state: FileState | None, f: RemoteFile, local: Path) -> bool:
    """Whether the record's verified copy of ``f`` is still what the host has and what is
    on disk (local size, then mtime; a touched file is re-hashed)."""
    if state is None or (state.remote_size, state.remote_mtime) != (f.size, f.mtime):
        return False
    try:
        st = local.stat()
    except FileNotFoundError:
        return False
    if st.st_size != f.size:
        return False
    return st.st_mtime_ns == state.local_mtime_ns or sha256_file(local) == state.sha256


class _Fetcher:
    """Downloads the queued files of one source, ``parallel_files`` at a time, one SSH
    connection per worker thread."""

    def __init__(self, host: Host, login: Login, dest: Path, writer: RecordWriter,
                 verifier: Verifier, progress: Progress, outcome: Outcome) -> None:  # fmt: skip
        self.host, self.login, self.dest = host, login, dest
        self.writer, self.verifier, self.outcome = writer, verifier, outcome
        self.progress = progress
        self.lock = threading.Lock()
        self.todo: queue.Queue[RemoteFile] = queue.Queue()
        self.errors: list[BaseException] = []
        self.stop = threading.Event()

    def _on_bytes(self, n: int) -> None:
        # A scheduler's stop warning (SLURM's --signal) stops every download where it is:
        # each .part is kept and resumed when the task is requeued.
        stop.check()
        with self.lock:
            self.progress.update(n)

    def run(self, files: list[RemoteFile], first: Connection, workers: int) -> None:
        for f in files:
            self.todo.put(f)
        threads = []
        for i in range(max(1, min(workers, len(files)))):
            t = threading.Thread(
                target=self._worker, args=(first if i == 0 else None,), daemon=True
            )
            t.start()
            threads.append(t)
        for t in threads:
            while t.is_alive():
                t.join(0.2)
        stopped = [e for e in self.errors if isinstance(e, stop.StopRequested)]
        if self.errors:
            raise (stopped or self.errors)[0]
        stop.check()

    def _worker(self, conn: Connection | None) -> None:
        own = conn is None
        try:
            if conn is None:
                conn = connect(self.host, self.login)
            sftp = conn.sftp()
            try:
                while not self.stop.is_set():
                    try:
                        f = self.todo.get_nowait()
                    except queue.Empty:
                        return
                    self._fetch(conn, sftp, f)
            finally:
                sftp.close()
        except BaseException as exc:  # re-raised by run() in the task's thread
            with self.lock:
                self.errors.append(exc)
            self.stop.set()
        finally:
            if own and conn is not None:
                conn.close()

    def _fetch(self, conn: Connection, sftp, f: RemoteFile) -> None:
        final = self.dest / f.rel
        resumable = self.writer.start(f.rel, f.size, f.mtime)
        expected: dict[str, tuple[str, str | None] | BaseException] = {}

        def ask() -> None:
            try:
                expected["v"] = self.verifier.expected(conn, f)
            except BaseException as exc:
                expected["v"] = exc

        asker = threading.Thread(target=ask, daemon=True)  # hashes while the file downloads
        asker.start()
        t0 = time.monotonic()
        got = download(sftp, f.path, final, f.size, self._on_bytes, resume=resumable)
        if got.resumed_from:
            log.info("%s: resumed %s from byte %d of %d (%d transferred)", self.host.label,
                     f.rel, got.resumed_from, f.size, got.transferred)  # fmt: skip
        after = sftp.stat(f.path)
        if (int(after.st_size or 0), int(after.st_mtime or 0)) != (f.size, f.mtime):
            part_path(final).unlink(missing_ok=True)
            raise SyncError(
                f"{self.host.where()}: {f.path} changed while it was downloaded (size "
                f"{f.size} -> {after.st_size}); rerun once its producer has finished"
            )
        asker.join()
        result = expected["v"]
        if isinstance(result, BaseException):
            raise result
        method, sha = result
        if sha is not None and sha != got.sha256:
            part_path(final).unlink(missing_ok=True)
            raise SyncError(
                f"{self.host.where()}: {f.path}: the downloaded bytes hash to "
                f"{got.sha256[:16]}..., but the {method} says {sha[:16]}...; the .part was "
                f"removed: rerun to download it again (if it repeats, the file on the host "
                "is changing or the manifest is stale)"
            )
        publish(final)
        seconds = max(time.monotonic() - t0, 1e-9)
        state = FileState(f.path, f.size, f.mtime, got.sha256, method, final.stat().st_mtime_ns)
        self.writer.done(f.rel, state)
        log.info("%s: %s: %.1f MB in %.1f s (%.1f MB/s), verified: %s", self.host.label, f.rel,
                 got.transferred / 1e6, seconds, got.transferred / 1e6 / seconds, method)  # fmt: skip
        with self.lock:
            self.outcome.files[f.rel] = state
            self.outcome.downloaded.append(f.rel)
            self.outcome.transferred += got.transferred
            if got.resumed_from:
                self.outcome.resumed[f.rel] = got.resumed_from


def sync_source(
    source: SyncSource,
    params: SyncParams,
    paths: RunPaths,
    spec: StageSpec,
    task: int,
    environ: dict[str, str] | None = None,
) -> CompletionMarker:
    """Sync ``source`` (task ``task`` of ``spec``) and publish its completion marker.
    Raises ``RemoteError`` subclasses (connection, host key, login, listing, transfer,
    verification), ``CredentialsError``, ``StorageError`` (disk full)."""
    t0 = time.monotonic()
    where = f"sync source {source.name}"
    login = resolve_login(
        where,
        source.username,
        key_file=source.key_file,
        agent=bool(source.agent),
        password_env=source.password_env,
        credentials_file=source.credentials_file,
        environ=environ,
    )
    host = host_of(source, params, login)
    dest = dest_dir(paths, params, source)
    n_slots = params.parallel_sources
    slot_files = (
        [paths.storage.local_file(paths.sync_slot(i)) for i in range(int(n_slots))]
        if n_slots and getattr(paths.storage, "is_local", False)
        else []
    )
    try:
        with slot(slot_files, where):
            outcome, verifier = _sync(source, params, paths, task, host, login, dest)
    except EmbedfleetError as exc:
        raise type(exc)(mask(str(exc), login.secrets())) from None
    wall = time.monotonic() - t0
    outputs = [
        OutputFile(_marker_path(paths, params, source, rel), st.remote_size, st.sha256)
        for rel, st in sorted(outcome.files.items())
    ]
    methods = sorted({st.verification for st in outcome.files.values()})
    changed = sorted(
        rel
        for rel in outcome.downloaded
        if (before := outcome.previous.get(rel)) is None
        or before.sha256 != outcome.files[rel].sha256
    )
    marker = CompletionMarker(
        stage=spec.name,
        task=task,
        num_tasks=spec.num_tasks,
        config_hash=spec.config_hash,
        counts={
            "files": len(outcome.files),
            "downloaded": len(outcome.downloaded),
            "skipped": len(outcome.skipped),
            "vanished": len(outcome.vanished),
            "bytes": sum(st.remote_size for st in outcome.files.values()),
            "transferred_bytes": outcome.transferred,
        },
        outputs=outputs,
        extra={
            "source": source.name,
            "host": host.name,
            "username": login.username,
            "remote_dir": source.remote_dir,
            "dest": str(dest),
            "verification": methods,
            "exec_unavailable": verifier.exec_why if verifier.exec_ok is False else None,
            "files": {
                rel: {
                    "remote_path": st.remote_path,
                    "remote_mtime": st.remote_mtime,
                    "verification": st.verification,
                }
                for rel, st in sorted(outcome.files.items())
            },
            "vanished": outcome.vanished,
            "resumed": outcome.resumed,
            "changed": changed,
        },
        wall_seconds=wall,
    )
    write_marker(paths.storage, paths.marker(spec.stage_dir, task), marker)
    rate = outcome.transferred / 1e6 / max(wall, 1e-9)
    log.info(
        "%s: %d file(s), %d downloaded (%.1f MB in %.1f s, %.1f MB/s), %d skipped as verified, "
        "%d vanished remotely; verification: %s",
        where, len(outcome.files), len(outcome.downloaded), outcome.transferred / 1e6, wall,
        rate, len(outcome.skipped), len(outcome.vanished), ", ".join(methods) or "-",
    )  # fmt: skip
    if SIZE_ONLY in methods:
        log.warning(
            "%s: some files were checked by size only: the host runs no sha256sum for this "
            "account and no manifest (embedfleet markers, SHA256SUMS) describes them",
            where,
        )
    return marker


def _marker_path(paths: RunPaths, params: SyncParams, source: SyncSource, rel: str) -> str:
    if params.dest:
        return str(dest_dir(paths, params, source) / rel)
    return f"{paths.sync_source(source.name)}/{rel}"


def _sync(
    source: SyncSource,
    params: SyncParams,
    paths: RunPaths,
    task: int,
    host: Host,
    login: Login,
    dest: Path,
) -> tuple[Outcome, Verifier]:
    where = host.label
    first = connect(host, login)
    try:
        sftp = first.sftp()
        try:
            files = list_matches(sftp, source.remote_dir, source.patterns, where)
        finally:
            sftp.close()
        writer = RecordWriter(paths.storage, paths.sync_record(task))
        outcome = Outcome(previous=dict(writer.previous.files))
        todo = []
        for f in files:
            state = writer.record.files.get(f.rel)
            if _unchanged(state, f, dest / f.rel):
                assert state is not None
                outcome.files[f.rel] = state
                outcome.skipped.append(f.rel)
            else:
                if state is not None:
                    log.info("%s: %s changed on the host (size %d -> %d); downloading it "
                             "again", where, f.rel, state.remote_size, f.size)  # fmt: skip
                todo.append(f)
        seen = {f.rel for f in files}
        outcome.vanished = sorted(set(writer.previous.files) - seen)
        for rel in outcome.vanished:
            log.warning("%s: %s is no longer on the host (kept here, not deleted: %s)",
                        where, rel, dest / rel)  # fmt: skip
        log.info(
            "%s: %d file(s) match on %s:%s, %d to download (%.1f MB), %d verified before",
            where, len(files), host.name, source.remote_dir, len(todo),
            sum(f.size for f in todo) / 1e6, len(outcome.skipped),
        )  # fmt: skip
        verifier = Verifier(source.remote_dir, files)
        if todo:
            total = sum(f.size for f in todo)
            progress = Progress(total, f"sync {source.name}", log, unit="B")
            try:
                _Fetcher(host, login, dest, writer, verifier, progress, outcome).run(
                    todo, first, int(params.parallel_files)
                )
            finally:
                progress.close()
        return outcome, verifier
    finally:
        first.close()


def run(ctx: TaskContext) -> None:
    params: SyncParams = to_params(ctx.cfg.sync, SyncParams)
    sources = parse_sources(params.sources)
    task = ctx.identity.task_index
    if task >= len(sources):
        raise ConfigError(f"sync task {task}: sync.sources has only {len(sources)} source(s)")
    marker = sync_source(sources[task], params, ctx.paths, ctx.spec, task)
    changed = marker.extra.get("changed") or []
    if changed and feeds_merge(ctx.cfg):
        invalidate_downstream(ctx, sources[task].name, changed)


def invalidate_downstream(ctx: TaskContext, source: str, changed: list[str]) -> None:
    """Files the merge reads changed (a new file, or one downloaded again with other
    content): set aside the merge's marker, and those of the planned stages that read the
    merge, with the reason, so that the next launch (the local launcher: this one) redoes
    them instead of trusting outputs made from the old files."""
    names = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    reason = f"sync source {source} downloaded new or changed files the merge reads ({names})"
    after: set[str] = {MERGE_STAGE}
    stage_dirs = [(MERGE_DIR, 1)]
    for spec in ctx.plan.stages:
        if spec.name != MERGE_STAGE and after.intersection(spec.depends_on):
            after.add(spec.name)
            stage_dirs.append((spec.stage_dir, spec.num_tasks))
    for stage_dir, num_tasks in stage_dirs:
        for t in range(num_tasks):
            if invalidate_marker(ctx.paths.storage, ctx.paths.marker(stage_dir, t), reason):
                log.warning(
                    "%s: its completion marker (%s task %d) was set aside, so it is redone: %s",
                    stage_dir,
                    stage_dir,
                    t,
                    reason,
                )
