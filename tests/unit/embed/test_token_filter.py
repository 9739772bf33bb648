"""The token-length filter: rows over max_length are dropped and counted, never cut."""

from lib.embed.token_filter import filter_by_length


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
