"""A conversation's parts (lib.data.text.chat_parts): what metadata.parquet keeps of a chat
beside its vector, and the embedded text they make."""

from __future__ import annotations

import pyarrow as pa
import pytest

from lib.core.errors import DatasetError
from lib.data.params import ChatParams, TextMode
from lib.data.text import build_chat_parts, build_texts, chat_parts

CHAT = ChatParams()


def test_multi_turn_prompt_is_every_turn_before_the_last_assistant_turn():
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>add them</think>4"},
    ]
    p = chat_parts(msgs, CHAT)
    assert p.user_prompt == "system: be brief\n\nuser: hi\n\nassistant: hello\n\nuser: 2+2?"
    assert (p.think_text, p.response_text, p.num_turns) == ("add them", "4", 5)
    assert p.text(CHAT) == f"{p.user_prompt}\n\nadd them\n\n4"


def test_separate_reasoning_key_wins_over_inline_think():
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>inline</think>a", "reasoning_content": "kept"},
    ]
    p = chat_parts(msgs, CHAT)
    assert (p.user_prompt, p.think_text, p.response_text, p.num_turns) == (
        "user: q",
        "kept",
        "a",
        2,
    )


def test_no_assistant_turn_and_empty_think():
    p = chat_parts([{"role": "user", "content": "only a question"}], CHAT)
    assert (p.think_text, p.response_text, p.num_turns) == ("", "", 1)
    assert chat_parts([], CHAT) is None and chat_parts(None, CHAT) is None


def test_parts_and_texts_agree_and_bad_rows_named():
    rows = [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        None,
        [{"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>t</think>d"}],
    ]
    table = pa.table({"messages": rows})
    parts = build_chat_parts(table, CHAT)
    texts = build_texts(table, TextMode.chat, "text", "{text}", CHAT)
    assert [None if p is None else p.text(CHAT) for p in parts] == texts
    assert texts == ["user: a\n\nb", None, "user: c\n\nt\n\nd"]
    with pytest.raises(DatasetError, match="row 0: messages must be a list"):
        build_chat_parts(pa.table({"messages": ["not a list"]}), CHAT)
