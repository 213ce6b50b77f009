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


# ---------------------------------------------------------------- messages as read (issue 17: 8, 9, 19)

CALL = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}


def test_sharegpt_turns_honour_weight_zero_as_messages_do(chat_tokenizer, tokenizer):
    record = {"conversations": [
        {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red", "weight": 0},
        {"from": "human", "value": "Another."}, {"from": "gpt", "value": "Blue"}]}
    example = normalise(0, record)
    assert example.messages[1]["weight"] == 0
    assert _target_text(tokenizer, chat_tokenizer.encode(0, example.messages)) == "Blue<|im_end|>"


def test_stored_messages_are_the_example_as_read_with_what_was_trained_marked(chat_tokenizer, hf_engine):
    from curate.score import score_conversations

    messages = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "And now?"}]
    table = score_conversations([{"id": "r", "messages": messages}], hf_engine, chat_tokenizer)
    stored = table.column("messages").to_pylist()[0]
    assert [(m["role"], m["content"], m["trained"]) for m in stored] == [
        ("user", "Say yes.", False), ("assistant", "yes", True), ("user", "And now?", False)]


def test_a_tool_call_the_template_does_not_write_is_a_reject_not_text_only(chat_tokenizer):
    """SmolLM2's template renders content only: the call would vanish, so the row is rejected."""
    example = normalise(0, {"messages": [{"role": "user", "content": "Look x up."},
                                         {"role": "assistant", "content": "Looking.", "tool_calls": [CALL]}]})
    assert json.loads(example.messages[1]["tool_calls"])[0]["function"]["name"] == "lookup"
    with pytest.raises(RowError, match="does not write this turn's tool call"):
        chat_tokenizer.encode(0, example.messages)


def test_tool_results_and_reasoning_fields_are_read(chat_tokenizer, tokenizer):
    example = normalise(0, {"messages": [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": {"found": True}},
        {"role": "assistant", "content": "A", "reasoning_content": "because"}]})
    assert example.messages[2] == {"role": "tool", "content": '{"found": true}', "tool_call_id": "c1"}
    assert example.messages[3]["reasoning"] == "because"
    # SmolLM2's template knows no think block: the trace is trained as the answer's own text.
    encoded = ChatTokenizer(tokenizer, train_turns="last").encode(0, example.messages)
    assert _target_text(tokenizer, encoded) == "<think>\nbecause\n</think>\n\nA<|im_end|>"
    assert _target_text(tokenizer, ChatTokenizer(tokenizer, train_turns="last", reasoning="drop")
                        .encode(0, example.messages)) == "A<|im_end|>"
