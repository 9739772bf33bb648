"""Build the text to embed from a row: one field, a template over fields, or a chat.

Chat mode joins every turn before the last assistant turn into the prompt and orders the
parts prompt -> think -> response, so the response comes last, where last-token pooling
reads. The think part comes from a separate key on the assistant turn
(``reasoning_content``) or from ``<think>...</think>`` inside its content.

A column read as bytes (pyarrow reads a CSV column that is not valid UTF-8 as binary) is
decoded with ``TextDecoding``, never turned into ``"b'...'"`` by ``str()``; a text column
of another type (ints) is refused unless ``cast_text`` is set.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from lib.core.errors import DatasetError
from lib.data.params import ChatParams, EncodingErrors, TextMode

_THINK = re.compile(r"<think>(.*?)</think>", re.S)


def required_columns(mode: TextMode, text_field: str, template: str, chat: ChatParams) -> list[str]:
    """Columns the text builder reads."""
    if mode == TextMode.field:
        return [text_field]
    if mode == TextMode.template:
        return sorted({name for _, name, _, _ in string.Formatter().parse(template) if name})
    return [chat.messages_field]


def check_columns(needed: list[str], available: list[str], where: str, key: str) -> None:
    missing = [c for c in needed if c not in available]
    if missing:
        raise DatasetError(
            f"{where}: column(s) {', '.join(map(repr, missing))} not found (from {key}); "
            f"the dataset has: {', '.join(available)}"
        )


def split_think(content: str) -> tuple[str, str]:
    """(think, response) from an assistant message that may embed <think>...</think>."""
    thoughts = [m.strip() for m in _THINK.findall(content)]
    response = _THINK.sub("", content).strip()
    return "\n".join(t for t in thoughts if t), response


@dataclass(frozen=True)
class ChatParts:
    """A conversation split as it is embedded: the turns before the last assistant turn
    (formatted by ``turn_template``), that turn's reasoning and its response, and the
    number of messages in the conversation."""

    user_prompt: str
    think_text: str
    response_text: str
    num_turns: int

    def text(self, cfg: ChatParams) -> str | None:
        parts = [p for p in (self.user_prompt, self.think_text, self.response_text) if p]
        return cfg.part_separator.join(parts) if parts else None


def chat_parts(messages: Any, cfg: ChatParams) -> ChatParts | None:
    """The parts of one conversation; ``None`` if it has no messages."""
    if messages is None:
        return None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"{cfg.messages_field} must be a list of {{role, content}} objects")
    if not messages:
        return None
    last_assistant = max(
        (i for i, m in enumerate(messages) if m.get(cfg.role_key) == cfg.assistant_role),
        default=None,
    )
    if last_assistant is None:
        turns, think, response = messages, "", ""
    else:
        turns = messages[:last_assistant]
        final = messages[last_assistant]
        think_inline, response = split_think(str(final.get(cfg.content_key) or ""))
        think = str(final.get(cfg.think_key) or "").strip() or think_inline
    prompt = cfg.turn_separator.join(
        cfg.turn_template.format(role=m.get(cfg.role_key, ""), content=m.get(cfg.content_key) or "")
        for m in turns
    )
    return ChatParts(prompt, think, response, len(messages))


def chat_text(messages: Any, cfg: ChatParams) -> str | None:
    """Text of one conversation; ``None`` if it has no usable turns."""
    parts = chat_parts(messages, cfg)
    return None if parts is None else parts.text(cfg)


@dataclass(frozen=True)
class TextDecoding:
    """How a text column that is not a string becomes text; ``where`` and ``first_row``
    name the file and the dataset row of the table's first row in messages."""

    encoding: str = "utf-8"
    errors: EncodingErrors = EncodingErrors.error
    cast: bool = False
    where: str = "the dataset"
    first_row: int = 0
    # The dataset rows of the table's rows when they are not contiguous (a sample).
    rows: tuple[int, ...] | None = None

    def row(self, i: int) -> int:
        """The dataset row of the table's row ``i``."""
        return self.rows[i] if self.rows is not None else self.first_row + i


def _decode(values: list[bytes | None], column: str, dec: TextDecoding) -> list[str | None]:
    out: list[str | None] = []
    errors = "replace" if EncodingErrors(dec.errors) == EncodingErrors.replace else "strict"
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            out.append(v.decode(dec.encoding, errors))
        except UnicodeDecodeError as exc:
            raise DatasetError(
                f"{dec.where}: row {dec.row(i)}, column {column!r}: byte offset "
                f"{exc.start} of the value ({v[exc.start : exc.start + 4]!r}) is not valid "
                f"{dec.encoding} ({exc.reason}). Set dataset.encoding to the file's encoding "
                "(e.g. latin-1, cp1252), or dataset.encoding_errors=replace to embed "
                "undecodable bytes as U+FFFD, or fix the file."
            ) from exc
    return out


def column_texts(table: pa.Table, column: str, dec: TextDecoding, *, text: bool) -> list[Any]:
    """The values of ``column``: bytes decoded; for the text column (``text``), anything
    but a string refused unless ``dec.cast``."""
    col = table.column(column)
    t = col.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return _decode(col.to_pylist(), column, dec)
    values = col.to_pylist()
    stringy = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    if not text or stringy or pa.types.is_null(t):
        return values
    if pa.types.is_dictionary(t) and pa.types.is_string(t.value_type):
        return values
    if not dec.cast:
        first = next((i for i, v in enumerate(values) if v is not None), None)
        shown = f" (row {dec.row(first)}: {values[first]!r})" if first is not None else ""
        raise DatasetError(
            f"{dec.where}: text column {column!r} has type {t}, not text{shown}. Point "
            "dataset.text_field to a text column, or set dataset.cast_text=true to embed "
            "str() of each value."
        )
    return [None if v is None else str(v) for v in values]


def build_texts(
    table: pa.Table,
    mode: TextMode,
    text_field: str,
    template: str,
    chat: ChatParams,
    prefix: str = "",
    decoding: TextDecoding | None = None,
) -> list[str | None]:
    """One text per row (``None`` where the row has no text). Raises ``DatasetError`` for
    bytes that do not decode or a text column that is not text (see ``TextDecoding``)."""
    dec = decoding or TextDecoding()
    if mode == TextMode.field:
        values = column_texts(table, text_field, dec, text=True)
        return [None if v is None else prefix + v for v in values]
    if mode == TextMode.template:
        names = required_columns(mode, text_field, template, chat)
        cols = {n: column_texts(table, n, dec, text=False) for n in names}
        out: list[str | None] = []
        for i in range(table.num_rows):
            row = {n: cols[n][i] for n in names}
            out.append(
                None if any(v is None for v in row.values()) else prefix + template.format(**row)
            )
        return out
    out = []
    for parts in build_chat_parts(table, chat, dec):
        text = None if parts is None else parts.text(chat)
        out.append(None if text is None else prefix + text)
    return out


def build_chat_parts(
    table: pa.Table, chat: ChatParams, decoding: TextDecoding | None = None
) -> list[ChatParts | None]:
    """The ``ChatParts`` of every row (``None`` for a row without messages). Raises
    ``DatasetError`` naming the row of a value that is not a list of messages."""
    dec = decoding or TextDecoding()
    out: list[ChatParts | None] = []
    for i, messages in enumerate(table.column(chat.messages_field).to_pylist()):
        try:
            out.append(chat_parts(messages, chat))
        except (ValueError, KeyError) as exc:
            raise DatasetError(f"{dec.where}: row {dec.row(i)}: {exc}") from exc
    return out
