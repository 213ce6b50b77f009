"""Target spans: the trained tokens are exactly the assistant contents plus end-of-turn."""

import json

import pytest

from curate.data import RowError, normalise
from curate.tokenize import ChatTokenizer


def _target_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, keep in zip(example.input_ids, example.target) if keep])


def test_targets_decode_to_the_assistant_texts_and_end_of_turn(chat_tokenizer, tokenizer, sample_path):
    end_of_turn = "<|im_end|>"
    for row, line in enumerate(sample_path.read_text().splitlines()):
        example = normalise(row, json.loads(line))
        encoded = chat_tokenizer.encode(row, example.messages)
        answers = [m["content"] for m in example.messages if m["role"] == "assistant"]
        assert _target_text(tokenizer, encoded) == "".join(a + end_of_turn for a in answers)
        assert encoded.input_ids == tokenizer(chat_tokenizer.render(example.messages), add_special_tokens=False)["input_ids"]


def test_multi_turn_scores_every_assistant_turn_and_no_user_turn(chat_tokenizer, tokenizer):
    messages = [
        {"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "yes"}, {"role": "assistant", "content": "Again: yes"},
    ]
    encoded = chat_tokenizer.encode(0, messages)
    assert _target_text(tokenizer, encoded) == "yes<|im_end|>Again: yes<|im_end|>"
    # The user's "yes" (same text as the first answer) is not a target.
    assert sum(encoded.target) == len(tokenizer("yes")["input_ids"]) + len(tokenizer("Again: yes")["input_ids"]) + 2


def test_over_long_examples_are_rejected_unless_truncation_is_asked_for(tokenizer):
    messages = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(map(str, range(200)))}]
    with pytest.raises(RowError, match="over --max-length 64"):
        ChatTokenizer(tokenizer, max_length=64).encode(0, messages)
    truncated = ChatTokenizer(tokenizer, max_length=64, truncate=True).encode(0, messages)
    assert truncated.truncated and len(truncated.input_ids) == 64 and any(truncated.target)


def test_truncation_that_leaves_no_response_is_rejected(tokenizer):
    messages = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(RowError, match="no response token"):
        ChatTokenizer(tokenizer, max_length=16, truncate=True).encode(0, messages)
