"""Read stored activations back: ``ActivationReader(run_dir)``.

It lists the shards from the tasks' ``metadata.json`` (local, ``gs://``, ``s3://``),
reads a shard's header and the frames it needs by range reads (one layer of a remote
shard is fetched without the others: no full download), checks each frame read against
the sha256 the task recorded, and undoes compression and byte-shuffle::

    reader = ActivationReader("gs://bucket/runs/fineweb")
    for chunk in reader.iter_layer(16):            # shard by shard, in sample-id order
        chunk.sample_ids, chunk.lengths, chunk.activations  # (tokens, hidden) tensor
    reader.sample(1234, 16)                        # one sample's (n, hidden) by shard lookup

A frame whose bytes do not match its recorded sha256 raises ``ShardValidationError``
naming the shard and the task to rerun.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lib.core.errors import ShardValidationError
from lib.core.paths import EXTRACT_DIR, RunPaths
from lib.core.storage import Storage
from lib.extract.shardfile import SHUFFLE_KEY, layer_tensor, parse_header, tensor_array


@dataclass
class ActivationChunk:
    """One shard's samples: ``activations`` (tokens, hidden) of one layer, the samples'
    ids and lengths (their tokens are consecutive rows of ``activations``)."""

    shard: str
    sample_ids: Any
    lengths: Any
    activations: Any
    token_ids: Any | None = None

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(np.asarray(self.lengths, dtype=np.int64))])


def _bf16(bits: np.ndarray, as_torch: bool) -> Any:
    import torch

    t = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)
    return t if as_torch else t.float().numpy()


class ActivationReader:
    """The activations of one run dir's extract stage (see the module)."""

    def __init__(self, run: str | Path | RunPaths | Storage, *, verify: bool = True) -> None:
        self.paths = run if isinstance(run, RunPaths) else RunPaths(run)
        self.storage = self.paths.storage
        self.verify = verify
        listing = self.storage.list(f"{EXTRACT_DIR}/")
        metas = sorted(n for n in listing if n.endswith("/metadata.json") and "/task_" in n)
        if not metas:
            raise FileNotFoundError(
                f"{self.storage.url(EXTRACT_DIR)}: no task metadata.json; run the extract stage"
            )
        self.tasks = [self.storage.read_json(n) for n in metas]
        self.shards: list[dict[str, Any]] = []
        for meta in self.tasks:
            for s in meta["shards"]:
                self.shards.append({**s, "_meta": meta})
        self.shards.sort(key=lambda s: s["sample_ids"][0])
        self._first_ids = [s["sample_ids"][0] for s in self.shards]
        first = self.tasks[0]
        self.layers: list[int] = list(first["layers"])
        self.hidden_size = int(first["hidden_size"])
        self.dtype = str(first["dtype"])
        self._headers: dict[str, tuple[dict, int]] = {}

    # -- raw access ---------------------------------------------------------------------
    def _range(self, name: str, offset: int, size: int) -> bytes:
        with self.storage.open(name) as fh:
            fh.seek(offset)
            out = fh.read(size)
        return bytes(out)

    def _frame(self, shard: dict[str, Any], key: str) -> bytes:
        frames = shard["frames"]
        offset, size, sha = frames[key]
        raw = self._range(shard["name"], offset, size)
        if self.verify and hashlib.sha256(raw).hexdigest() != sha:
            task = shard["_meta"]["task"]
            raise ShardValidationError(
                f"{self.storage.url(shard['name'])}: part {key} does not match the sha256 "
                f"task {task} recorded (modified or corrupted); delete the shard and its "
                f".json marker and rerun the extract stage to redo task {task}"
            )
        if shard["_meta"]["compression"] == "zstd":
            import zstandard

            return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        return raw

    def _header(self, shard: dict[str, Any]) -> tuple[dict, int]:
        name = shard["name"]
        if name not in self._headers:
            if shard["_meta"]["compression"] == "zstd":
                header, _ = parse_header(self._frame(shard, "__header__"))
                self._headers[name] = (header, 0)
            else:
                head = self._range(name, 0, 8)
                size = int.from_bytes(head, "little")
                header, start = parse_header(head + self._range(name, 8, size))
                self._headers[name] = (header, start)
        return self._headers[name]

    def tensor(self, shard: dict[str, Any], name: str) -> np.ndarray:
        """Tensor ``name`` of ``shard`` (an entry of ``self.shards``) as stored (bf16: its
        uint16 bits)."""
        header, start = self._header(shard)
        info = header[name]
        if shard["_meta"]["compression"] == "zstd":
            data = self._frame(shard, name)
        else:
            a, b = info["data_offsets"]
            data = self._range(shard["name"], start + a, b - a)
            if self.verify:
                self._check_plain(shard)
        chunks = None
        shuffle = header.get("__metadata__", {}).get(SHUFFLE_KEY)
        if shuffle and name.startswith("layer_"):
            width = int(np.prod(info["shape"][1:]))
            chunks = [n * width for n in json.loads(shuffle)]
        return tensor_array(header, name, data, chunks)

    def _check_plain(self, shard: dict[str, Any]) -> None:
        # Uncompressed shards are checked whole, once per reader.
        if shard.get("_checked"):
            return
        if self.storage.sha256(shard["name"]) != shard["sha256"]:
            task = shard["_meta"]["task"]
            raise ShardValidationError(
                f"{self.storage.url(shard['name'])} does not match the sha256 task {task} "
                f"recorded; delete it and its .json marker and rerun the extract stage"
            )
        shard["_checked"] = True

    # -- what users call ----------------------------------------------------------------
    def _layer(self, shard: dict[str, Any], layer: int, as_torch: bool) -> Any:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not extracted; this run has layers {self.layers}")
        a = self.tensor(shard, layer_tensor(layer))
        if self.dtype == "bf16":
            return _bf16(a, as_torch)
        if as_torch:
            import torch

            return torch.from_numpy(a.copy())
        return a

    def iter_layer(self, layer: int, *, as_torch: bool = True, tokens: bool = False):
        """Yield an ``ActivationChunk`` per shard of every task, in sample-id order."""
        for shard in self.shards:
            yield self.chunk(shard, layer, as_torch=as_torch, tokens=tokens)

    def chunk(
        self, shard: dict[str, Any], layer: int, *, as_torch: bool = True, tokens: bool = False
    ) -> ActivationChunk:
        """Random access: one shard's samples of ``layer``."""
        return ActivationChunk(
            shard["name"],
            self.tensor(shard, "sample_ids"),
            self.tensor(shard, "lengths"),
            self._layer(shard, layer, as_torch),
            self.tensor(shard, "token_ids") if tokens else None,
        )

    def shard_of(self, sample_id: int) -> dict[str, Any]:
        """The shard holding ``sample_id`` (``KeyError`` when none does)."""
        i = bisect.bisect_right(self._first_ids, sample_id) - 1
        if i < 0 or not (
            self.shards[i]["sample_ids"][0] <= sample_id <= self.shards[i]["sample_ids"][1]
        ):
            raise KeyError(f"sample {sample_id} is in no shard of {self.storage.url(EXTRACT_DIR)}")
        return self.shards[i]

    def sample(self, sample_id: int, layer: int, *, as_torch: bool = True) -> Any:
        """The (tokens, hidden) activations of one sample (``KeyError`` if not stored)."""
        c = self.chunk(self.shard_of(sample_id), layer, as_torch=as_torch)
        where = np.nonzero(np.asarray(c.sample_ids) == sample_id)[0]
        if not len(where):
            raise KeyError(f"sample {sample_id} was skipped (no text, or empty)")
        off = c.offsets()
        i = int(where[0])
        return c.activations[off[i] : off[i + 1]]
