import pyarrow as pa

from lib.data.params import ChatParams, TextMode
from lib.data.text import build_texts, chat_text, required_columns, split_think


def test_template_and_field_modes():
    t = pa.table({"title": ["A", None], "body": ["x", "y"]})
    assert build_texts(t, TextMode.field, "body", "", ChatParams()) == ["x", "y"]
    assert build_texts(t, TextMode.template, "", "{title}: {body}", ChatParams(), "p ") == [
        "p A: x",
        None,
    ]
    assert required_columns(TextMode.template, "", "{title}\n{body}", ChatParams()) == [
        "body",
        "title",
    ]


def test_chat_orders_prompt_think_response():
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>add them</think>4"},
    ]
    text = chat_text(msgs, ChatParams())
    assert text == "system: be brief\n\nuser: 2+2?\n\nadd them\n\n4"
    assert text.endswith("4")  # the response last, where last-token pooling reads


def test_chat_uses_last_assistant_turn_and_reasoning_key():
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "why?"},
        {"role": "assistant", "content": "because", "reasoning_content": "think hard"},
    ]
    text = chat_text(msgs, ChatParams())
    assert text == "user: hi\n\nassistant: hello\n\nuser: why?\n\nthink hard\n\nbecause"
    assert split_think("a<think>b</think>c") == ("b", "ac")
