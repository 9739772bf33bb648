"""A task's rows of the dataset as token sequences, in order, and their batches.

``truncate``: one sample per row, its first ``max_seq_length`` tokens; the sample id is
the dataset row index. ``pack``: the rows' tokens joined, each document followed by EOS,
cut into contexts of exactly ``max_seq_length`` tokens (the tail that does not fill one is
dropped, and counted); a context's id is ``task * 2**32 + k``; ``doc_ids`` holds each
token's dataset row and ``positions`` its position in that document.

Both are pure functions of the task's rows, so a resumed task regenerates the same
samples and skips the ones its finished shards hold.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from omegaconf import DictConfig

from lib.core.errors import ConfigError, DatasetError
from lib.data.columns import needed_columns
from lib.data.datasets import RowSource
from lib.data.params import NullText, TextMode
from lib.data.text import TextDecoding, build_texts

PACK_ID_BASE = 2**32
READ_ROWS = 256


@dataclass
class Sample:
    sample_id: int
    token_ids: np.ndarray  # int32 (n,)
    doc_ids: np.ndarray  # int64 (n,): the dataset row of every token
    positions: np.ndarray  # int32 (n,): position of every token in its document


@dataclass
class SampleCounts:
    rows: int = 0
    skipped_null: int = 0
    skipped_empty: int = 0
    dropped_tail_tokens: int = 0
    truncated: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def _texts(cfg: DictConfig, source: RowSource, start: int, stop: int) -> list[str | None]:
    d = cfg.dataset
    table = source.read(start, stop, needed_columns(cfg, source.columns))
    dec = TextDecoding(d.encoding, d.encoding_errors, bool(d.cast_text), source.description, start)
    return build_texts(table, TextMode(d.text_mode), d.text_field, d.template, d.chat, "", dec)


def _documents(
    cfg: DictConfig,
    source: RowSource,
    tokenizer,
    rows: tuple[int, int],
    counts: SampleCounts,
    *,
    add_special_tokens: bool,
) -> Iterator[tuple[int, list[int]]]:
    """(row, token ids) of every row with text in ``rows``; null texts refused unless
    ``dataset.on_null_text=drop``."""
    start, stop = rows
    for a in range(start, stop, READ_ROWS):
        b = min(a + READ_ROWS, stop)
        texts = _texts(cfg, source, a, b)
        nulls = [a + i for i, t in enumerate(texts) if t is None]
        if nulls and NullText(cfg.dataset.on_null_text) == NullText.error:
            raise DatasetError(
                f"{source.description}: {len(nulls)} row(s) have no text: rows "
                f"{', '.join(map(str, nulls[:10]))}. Fix the data, or set "
                "dataset.on_null_text=drop to skip them (they are counted in the task's "
                "metadata)."
            )
        counts.skipped_null += len(nulls)
        kept = [(a + i, t) for i, t in enumerate(texts) if t is not None]
        if not kept:
            continue
        encoded = tokenizer(
            [t for _, t in kept], add_special_tokens=add_special_tokens, truncation=False
        )["input_ids"]
        for (row, _), ids in zip(kept, encoded, strict=True):
            counts.rows += 1
            yield row, list(ids)


def truncate_samples(
    cfg: DictConfig,
    source: RowSource,
    tokenizer,
    rows: tuple[int, int],
    max_len: int,
    counts: SampleCounts,
) -> Iterator[Sample]:
    add = bool(cfg.extract.add_special_tokens)
    for row, ids in _documents(cfg, source, tokenizer, rows, counts, add_special_tokens=add):
        if not ids:
            counts.skipped_empty += 1
            continue
        if len(ids) > max_len:
            counts.truncated += 1
            ids = ids[:max_len]
        n = len(ids)
        yield Sample(
            row,
            np.asarray(ids, dtype=np.int32),
            np.full(n, row, dtype=np.int64),
            np.arange(n, dtype=np.int32),
        )


def pack_samples(
    cfg: DictConfig,
    source: RowSource,
    tokenizer,
    rows: tuple[int, int],
    max_len: int,
    counts: SampleCounts,
    task: int,
    limit: int | None,
) -> Iterator[Sample]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(
            "extract.packing=pack joins documents with the tokenizer's EOS token, but this "
            "tokenizer has none; use extract.packing=truncate"
        )
    tokens: list[int] = []
    docs: list[int] = []
    pos: list[int] = []
    k = 0
    for row, ids in _documents(cfg, source, tokenizer, rows, counts, add_special_tokens=False):
        if not ids:
            counts.skipped_empty += 1
            continue
        ids = [*ids, int(eos)]
        tokens += ids
        docs += [row] * len(ids)
        pos += range(len(ids))
        while len(tokens) >= max_len:
            if limit is not None and k >= limit:
                return
            yield Sample(
                task * PACK_ID_BASE + k,
                np.asarray(tokens[:max_len], dtype=np.int32),
                np.asarray(docs[:max_len], dtype=np.int64),
                np.asarray(pos[:max_len], dtype=np.int32),
            )
            k += 1
            del tokens[:max_len], docs[:max_len], pos[:max_len]
    counts.dropped_tail_tokens += len(tokens)


def batches(
    samples: Iterator[Sample], batch_size: int, max_tokens: int | None
) -> Iterator[list[Sample]]:
    """Consecutive samples, at most ``batch_size`` of them and at most ``max_tokens``
    padded tokens (rows x the longest), always at least one."""
    batch: list[Sample] = []
    longest = 0
    for s in samples:
        n = len(s.token_ids)
        grown = max(longest, n) * (len(batch) + 1)
        if batch and (len(batch) >= batch_size or (max_tokens is not None and grown > max_tokens)):
            yield batch
            batch, longest = [], 0
        batch.append(s)
        longest = max(longest, n)
    if batch:
        yield batch
