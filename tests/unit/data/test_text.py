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


def test_bytes_are_decoded_never_str_of_bytes():
    import pytest

    from lib.core.errors import DatasetError
    from lib.data.params import EncodingErrors
    from lib.data.text import TextDecoding

    t = pa.table({"text": pa.array([b"caf\xe9", b"plain", None], pa.binary())})
    where = TextDecoding(where="d.csv", first_row=10)
    with pytest.raises(DatasetError, match=r"d.csv: row 10, column 'text': byte offset 3"):
        build_texts(t, TextMode.field, "text", "", ChatParams(), decoding=where)
    latin = TextDecoding(encoding="latin-1")
    assert build_texts(t, TextMode.field, "text", "", ChatParams(), "p ", latin) == [
        "p café",
        "p plain",
        None,
    ]
    replace = TextDecoding(errors=EncodingErrors.replace)
    assert build_texts(t, TextMode.template, "", "<{text}>", ChatParams(), "", replace) == [
        "<caf\ufffd>",
        "<plain>",
        None,
    ]


def test_a_text_column_that_is_not_text_needs_cast_text():
    import pytest

    from lib.core.errors import DatasetError
    from lib.data.text import TextDecoding

    t = pa.table({"text": [None, 7, 8]})
    with pytest.raises(DatasetError, match=r"has type int64, not text \(row 1: 7\).*cast_text"):
        build_texts(t, TextMode.field, "text", "", ChatParams())
    cast = TextDecoding(cast=True)
    assert build_texts(t, TextMode.field, "text", "", ChatParams(), decoding=cast) == [
        None,
        "7",
        "8",
    ]
    # A template formats numbers as text by design: no cast needed.
    assert build_texts(t, TextMode.template, "", "n={text}", ChatParams()) == [None, "n=7", "n=8"]
