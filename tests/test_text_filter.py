import pyarrow as pa

from lib.config import ChatConfig, TextMode
from lib.text import build_texts, chat_text, required_columns, split_think
from lib.token_filter import filter_by_length


def test_template_and_field_modes():
    t = pa.table({"title": ["A", None], "body": ["x", "y"]})
    assert build_texts(t, TextMode.field, "body", "", ChatConfig()) == ["x", "y"]
    assert build_texts(t, TextMode.template, "", "{title}: {body}", ChatConfig(), "p ") == [
        "p A: x",
        None,
    ]
    assert required_columns(TextMode.template, "", "{title}\n{body}", ChatConfig()) == [
        "body",
        "title",
    ]


def test_chat_orders_prompt_think_response():
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>add them</think>4"},
    ]
    text = chat_text(msgs, ChatConfig())
    assert text == "system: be brief\n\nuser: 2+2?\n\nadd them\n\n4"
    assert text.endswith("4")  # the response last, where last-token pooling reads


def test_chat_uses_last_assistant_turn_and_reasoning_key():
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "why?"},
        {"role": "assistant", "content": "because", "reasoning_content": "think hard"},
    ]
    text = chat_text(msgs, ChatConfig())
    assert text == "user: hi\n\nassistant: hello\n\nuser: why?\n\nthink hard\n\nbecause"
    assert split_think("a<think>b</think>c") == ("b", "ac")


def test_filter_drops_not_truncates(tokenizer):
    texts = ["short text", "word " * 400, "another short one"]
    res = filter_by_length(tokenizer, texts, max_length=32, batch_size=2)
    assert res.kept == [0, 2]
    assert res.dropped == [1]
    assert res.dropped_token_counts[0] > 400  # counted, not cut at 32
    assert [len(ids) for ids in res.token_ids] == [
        len(tokenizer(t)["input_ids"]) for t in ("short text", "another short one")
    ]
    assert res.token_ids[0][0] == tokenizer.cls_token_id  # special tokens are counted
