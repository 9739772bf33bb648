"""Token-length filter, drop-not-truncate, run inside each shard task.

The fast (Rust) tokenizer encodes in batches, using all cores, with no truncation; rows
longer than ``max_length`` tokens are dropped and recorded, never cut. The token ids of
kept rows are returned so the embedding backend does not tokenize a second time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class FilterResult:
    kept: list[int] = field(default_factory=list)  # positions (within the shard) kept
    token_ids: list[list[int]] = field(default_factory=list)  # ids of kept rows, same order
    dropped: list[int] = field(default_factory=list)  # positions dropped
    dropped_token_counts: list[int] = field(default_factory=list)

    @property
    def kept_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


def _batch_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """The fastest exact batch encoder: the Rust backend's ``encode_batch_fast`` (parallel,
    no offsets, no Python wrapper per row) when there is one; else the tokenizer call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is not None:

        def encode(batch: list[str]) -> list[list[int]]:
            # The Python wrapper leaves its last truncation/padding on the backend.
            backend.no_truncation()
            backend.no_padding()
            return [e.ids for e in fast(batch, add_special_tokens=True)]

        return encode

    def encode_slow(batch: list[str]) -> list[list[int]]:
        return tokenizer(
            batch,
            add_special_tokens=True,
            truncation=False,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]

    return encode_slow


def filter_by_length(
    tokenizer, texts: list[str], max_length: int, batch_size: int = 1024
) -> FilterResult:
    """Tokenize ``texts`` in batches and split them into kept (<= max_length) and dropped.

    ``tokenizer`` is a Hugging Face tokenizer; special tokens are counted, as the model
    sees them.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    result = FilterResult()
    encode = _batch_encoder(tokenizer)
    # Silence "sequence length is longer than the specified maximum": we measure, not feed.
    saved = getattr(tokenizer, "model_max_length", None)
    try:
        if saved is not None:
            tokenizer.model_max_length = 1 << 62
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            for offset, ids in enumerate(encode(batch)):
                pos = start + offset
                if len(ids) > max_length:
                    result.dropped.append(pos)
                    result.dropped_token_counts.append(len(ids))
                else:
                    result.kept.append(pos)
                    result.token_ids.append(ids)
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved
    return result
