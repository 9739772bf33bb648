"""Build the text to embed from a row: one field, a template over fields, or a chat.

Chat mode joins every turn before the last assistant turn into the prompt and orders the
parts prompt -> think -> response, so the response comes last, where last-token pooling
reads. The think part comes from a separate key on the assistant turn
(``reasoning_content``) or from ``<think>...</think>`` inside its content.
"""

from __future__ import annotations

import re
import string
from typing import Any

import pyarrow as pa

from lib.core.errors import DatasetError
from lib.data.params import ChatParams, TextMode

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


def chat_text(messages: Any, cfg: ChatParams) -> str | None:
    """Text of one conversation; ``None`` if it has no usable turns."""
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
    parts = [p for p in (prompt, think, response) if p]
    return cfg.part_separator.join(parts) if parts else None


def build_texts(
    table: pa.Table,
    mode: TextMode,
    text_field: str,
    template: str,
    chat: ChatParams,
    prefix: str = "",
) -> list[str | None]:
    """One text per row (``None`` where the row has no text)."""
    if mode == TextMode.field:
        values = table.column(text_field).to_pylist()
        return [None if v is None else prefix + str(v) for v in values]
    if mode == TextMode.template:
        names = required_columns(mode, text_field, template, chat)
        cols = {n: table.column(n).to_pylist() for n in names}
        out: list[str | None] = []
        for i in range(table.num_rows):
            row = {n: cols[n][i] for n in names}
            out.append(
                None if any(v is None for v in row.values()) else prefix + template.format(**row)
            )
        return out
    out = []
    for i, messages in enumerate(table.column(chat.messages_field).to_pylist()):
        try:
            text = chat_text(messages, chat)
        except (ValueError, KeyError) as exc:
            raise DatasetError(f"row {i} of the range: {exc}") from exc
        out.append(None if text is None else prefix + text)
    return out
