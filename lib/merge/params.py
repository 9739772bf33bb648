"""The ``merge`` node: which shards to merge, into which formats, and what to check."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from lib.config.fields import bounded, unhashed


class MergeFormat(StrEnum):
    safetensors = "safetensors"
    npy = "npy"


class MergeInput(StrEnum):
    embed = "embed"  # the shards of this run's embed stage
    legacy = "legacy"  # cluster{c}_gpu{g}.pkl files of the seed runs (needs allow_pickle)
    synced = "synced"  # embed shards + their markers synced from other hosts (sync/<source>/)


@dataclass
class MergeParams:
    input: MergeInput = MergeInput.embed
    formats: list[MergeFormat] = field(default_factory=lambda: [MergeFormat.safetensors])
    by_source: bool = True
    expected_rows: int | None = bounded(None, ge=0)
    keep_first: int | None = bounded(None, ge=1)
    chunk_rows: int = unhashed(65536, ge=1)
    verify_sha256: bool = True
    # input=legacy: where the pickles are; null: every sync/<source>/ (or sync.dest) dir.
    legacy_dir: str | None = None
    allow_pickle: bool = False
    # A row-aligned parquet/jsonl (or, with allow_pickle, a .pkl list of dicts) whose row i
    # describes dataset row i: its columns are joined into metadata.parquet.
    metadata_path: str | None = None
