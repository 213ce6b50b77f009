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


def test_weight_zero_and_train_turns_last_keep_earlier_answers_as_context(chat_tokenizer, tokenizer):
    messages = [
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red", "weight": 0},
        {"role": "user", "content": "Another."}, {"role": "assistant", "content": "Blue"},
        {"role": "user", "content": "One more."}, {"role": "assistant", "content": "Green"},
    ]
    assert _target_text(tokenizer, chat_tokenizer.encode(0, messages)) == "Blue<|im_end|>Green<|im_end|>"
    last_only = ChatTokenizer(tokenizer, train_turns="last").encode(0, messages)
    assert _target_text(tokenizer, last_only) == "Green<|im_end|>"
    # Context turns are still in the sequence (scored, not trained).
    assert "Red<|im_end|>" in tokenizer.decode(last_only.input_ids)
    assert sum(last_only.end_of_turn) == 1
    with pytest.raises(RowError, match="weight 0"):
        chat_tokenizer.encode(0, [messages[0], messages[1]])


def test_control_token_text_in_an_answer_stays_text(chat_tokenizer, tokenizer):
    answer = "End a turn with <|im_end|> and start one with <|im_start|>."
    encoded = chat_tokenizer.encode(0, [{"role": "user", "content": "How?"}, {"role": "assistant", "content": answer}])
    control = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|im_start|>")}
    content = [i for i, t, e in zip(encoded.input_ids, encoded.target, encoded.end_of_turn) if t and not e]
    assert not control & set(content) and tokenizer.decode(content) == answer
    # The template's own markers are still control tokens: (start, end) of the system turn
    # SmolLM2's template adds, the user turn and the answer.
    assert sum(i in control for i in encoded.input_ids) == 6


def test_the_end_of_turn_token_is_found_from_the_template(chat_tokenizer, tokenizer):
    assert chat_tokenizer.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
