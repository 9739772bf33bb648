"""The fingerprint of a run's input: what makes "the same dataset" checkable at relaunch.

A run dir is resumed by its markers; a dataset file changed in place under the same path
(same row count) would otherwise be reported "already complete" with the old
embeddings. The fingerprint goes into the embed stage's config hash and ``plan.json``,
so a relaunch sees the change and names the file.

Per data file (``{file: {...}}``):

- local: the size and the sha256 of the whole file up to ``FULL_HASH_BYTES``, beyond it
  of its first and last ``EDGE_BYTES`` (a parquet footer, with every row group's
  offsets and statistics, is in the tail). The mtime is left out on purpose: a ``touch``
  or a copy of an identical file does not force a re-embed.
- object store (fsspec): the size and the object's version stamp (ETag, generation,
  md5/crc32c, ...) from ``fs.info``; the head/tail hash when the store has none.
- the builtin corpus: the Python version it is extracted from and its file's hash.
- Hugging Face datasets: the ``datasets`` library's own fingerprint of the table; a
  streamed hub dataset: its data files (in the local hub cache: each blob's content-hash
  name and size).
"""

from __future__ import annotations

import hashlib
import os
import platform
from typing import Any

import fsspec
from omegaconf import DictConfig

from lib.core.errors import DatasetError
from lib.data.datasets import (
    dataset_files,
    glob_files,
    hf_source,
    hub_files,
    is_dir,
    is_file_list,
    is_glob,
    is_hf_saved_dir,
    listed_files,
    resolve_format,
)
from lib.data.params import DatasetFormat

FULL_HASH_BYTES = 64 << 20
EDGE_BYTES = 4 << 20
# Version stamps object stores report in fs.info, most specific first.
_STAMP_KEYS = (
    "generation",
    "version_id",
    "VersionId",
    "ETag",
    "etag",
    "md5Hash",
    "crc32c",
    "blob_id",  # the hub (hf://)
)

Fingerprint = dict[str, dict[str, Any]]


def _hash_edges(fh, size: int) -> tuple[str, str]:
    digest = hashlib.sha256()
    if size <= FULL_HASH_BYTES:
        while block := fh.read(8 << 20):
            digest.update(block)
        return digest.hexdigest(), "full"
    digest.update(fh.read(EDGE_BYTES))
    fh.seek(size - EDGE_BYTES)
    digest.update(fh.read(EDGE_BYTES))
    return digest.hexdigest(), f"first and last {EDGE_BYTES >> 20} MiB"


def file_fingerprint(path: str) -> dict[str, Any]:
    """Size and content stamp of one data file (local path or fsspec URL)."""
    if "://" not in path:  # file:// too goes through fsspec, as open_source reads it
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            sha, scope = _hash_edges(fh, size)
        return {"size": size, "sha256": sha, "hashed": scope}
    fs, p = fsspec.core.url_to_fs(path)
    info = fs.info(p)
    size = int(info.get("size") or 0)
    for key in _STAMP_KEYS:
        if info.get(key):
            return {"size": size, key.lower(): str(info[key]).strip('"')}
    with fs.open(p, "rb") as fh:
        sha, scope = _hash_edges(fh, size)
    return {"size": size, "sha256": sha, "hashed": scope}


def _hub_file_fingerprint(path: str) -> dict[str, Any]:
    """A file of a snapshot in the local hub cache is a link to a blob named by the hash
    of its content (git's, or the LFS sha256): that name and the size, nothing read."""
    if "://" not in path and os.path.islink(path):
        blob = os.path.realpath(path)
        if os.path.basename(os.path.dirname(blob)) == "blobs":
            return {"size": os.path.getsize(blob), "hub_blob": os.path.basename(blob)}
    return file_fingerprint(path)


# A launch computes the fingerprint twice (the plan's hash, then the relaunch check):
# remembered for an unchanged (path, size, mtime) in this process.
_memo: dict[tuple, Fingerprint] = {}


def _memo_key(cfg: DictConfig) -> tuple | None:
    from lib.data.columns import cache_dir

    path = str(cfg.dataset.path)
    if "://" in path or not os.path.isfile(path):
        return None
    st = os.stat(path)
    d = cfg.dataset
    return (path, st.st_size, st.st_mtime_ns, str(d.format), str(cache_dir(cfg)))


def dataset_fingerprint(cfg: DictConfig) -> Fingerprint:
    """The fingerprint of ``cfg.dataset`` (see the module). Raises ``DatasetError`` as
    ``open_dataset`` does when the dataset cannot be found."""
    key = _memo_key(cfg)
    if key is not None and key in _memo:
        return _memo[key]
    found = _fingerprint(cfg)
    if key is not None:
        _memo[key] = found
    return found


def _fingerprint(cfg: DictConfig) -> Fingerprint:
    from lib.data.columns import cache_dir

    d = cfg.dataset
    if is_file_list(d.path):
        return {f: file_fingerprint(f) for f in listed_files(list(d.path), DatasetFormat(d.format))}
    path = str(d.path)
    fmt = resolve_format(path, DatasetFormat(d.format))
    if fmt == DatasetFormat.builtin:
        from lib.data.corpus import builtin_corpus_path

        local = builtin_corpus_path(path.removeprefix("builtin:"), cache_dir(cfg))
        return {path: {"python": platform.python_version(), **file_fingerprint(str(local))}}
    if fmt == DatasetFormat.hf:
        if d.get("streaming") and not os.path.isdir(path):
            hub = hub_files(path, d.split, d.subset, cache_dir(cfg))
            if hub is not None:  # its data files, as open_dataset reads them
                return {f: _hub_file_fingerprint(f) for f in hub.files}
            # Not materialised to hash: the hub's info of the cached dataset.
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never the hub at run time
            import datasets

            try:
                info = datasets.load_dataset_builder(path, d.subset).info
            except Exception as exc:
                raise DatasetError(
                    f"Hugging Face dataset {path!r}: its info could not be read from the "
                    f"local cache ({exc})"
                ) from exc
            return {
                f"hf:{path}[{d.split}]": {
                    "streamed": True,
                    "version": str(info.version),
                    "dataset_size": info.dataset_size,
                }
            }
        if is_hf_saved_dir(path) or not os.path.isdir(path):
            source = hf_source(path, d.split, d.subset, cache_dir(cfg))
            return {source.description: {"datasets_fingerprint": source.fingerprint}}
        files = dataset_files(path)
    elif is_glob(path):
        files = glob_files(path, DatasetFormat(d.format))
    elif is_dir(path):
        files = dataset_files(path, DatasetFormat(d.format))
    else:
        files = [path]
    return {f: file_fingerprint(f) for f in files}


def fingerprint_changes(old: Fingerprint, new: Fingerprint) -> list[str]:
    """What differs between two fingerprints, one line per file."""
    lines = []
    for f in sorted(set(old) | set(new)):
        if f not in new:
            lines.append(f"{f}: no longer part of the dataset")
        elif f not in old:
            lines.append(f"{f}: new in the dataset")
        elif old[f] != new[f]:
            was, now = old[f], new[f]
            what = (
                f"size {was.get('size')} -> {now.get('size')} bytes"
                if was.get("size") != now.get("size")
                else "same size, different content"
            )
            lines.append(f"{f}: changed since this run embedded it ({what})")
    return lines
