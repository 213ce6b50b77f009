"""Render a conversation with the model's chat template and find the tokens trained on.

What is trained is what the model must generate. For each trained assistant turn, the
targets are the tokens the model produces after the generation prompt for that answer to
come out: template text the model writes itself (gpt-oss's `<|channel|>final<|message|>`,
Qwen3's think block), the reasoning trace where it is kept, the content, any tool call, and
the end-of-turn token this turn really ends with (`<|end|>` or `<|return|>` on gpt-oss).
These ids are what the scorer scores and what Axolotl trains on: nothing re-tokenises
between scoring and training.

How, exactly, on any template:
1. The prompt of a trained turn is the template's generation prompt for the conversation
   before it, tokenized on its own: the prompt's ids are the ids the model is given at
   inference. The answer is tokenized from that boundary on, so no target token holds a
   character of the prompt (Qwen2.5 would otherwise merge its `\\n` with an answer's `\\n\\n`).
2. The turn's text is the template's rendering after that prompt. Every message content is
   located in the rendering by rendering placeholders in its place and putting it back (as
   is, trimmed, or as JSON): never guessed. A template that re-renders earlier turns
   differently (Mistral moves the system prompt; reasoning templates drop earlier traces)
   cannot train those turns in the context the model answers them in: the row is rejected
   with that reason.
3. Reasoning (`<think>…</think>` in the content, or a `reasoning_content`/`thinking` field)
   is given to the template as it knows it (`reasoning_content`, `thinking`, or the literal
   think block). Where the template opens a think block in its generation prompt but would
   drop the trace when re-rendering (DeepSeek-R1, QwQ), the turn is the trace the model
   writes after that prompt: reasoning, closing marker, answer, end of turn. `--reasoning
   drop` trains answers only, an empty think block being context.
4. The end of a turn is the special token right after its content, or for a turn that ends
   in a tool call, the first end-of-turn token after it (the template's own, found from
   probe conversations that may fail, and the tokenizer's end of sequence).
5. The text is tokenized with the template's special-token markers recognised and message
   contents never turned into control tokens: a copy of the tokenizer knows each special
   token under a private name, whose ids are mapped back to the model's own. At load, and
   on the first rows, curate's ids are checked against the tokenizer's own.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from curate.data import RowError

SYSTEM_PROMPT_POLICIES = ("keep", "merge", "drop")
TRAIN_TURNS = ("all", "last")
REASONING_POLICIES = ("keep", "drop")

# Private-use code points: they pass every normaliser unchanged and no real text holds them.
_SENTINEL = "\ue000{}\ue001"
_PLACEHOLDER = "\ue002{}\ue003"
_PLACEHOLDER_RE = re.compile("\ue002(\\d+)\ue003")
_REASONING_SLOT = 1_000_000  # placeholder index of message i's reasoning: _REASONING_SLOT + i

_THINK_BLOCK = re.compile(r"^\s*<think>(.*?)</think>(.*)$", re.DOTALL)
_THINK_CLOSE = re.compile(r"^(.*?)</think>(.*)$", re.DOTALL)
_THINK_OPEN_AT_END = re.compile(r"<think>(\s*)$")
_THINK_CLOSED_AT_END = re.compile(r"<think>\s*</think>\s*$")  # a generation prompt that turns thinking off

# Rows whose tokenization is checked against the model tokenizer's own, at the start of a run.
_ROWS_CHECKED = 32

# Curate's own message keys, never passed to a template.
_OWN_KEYS = {"weight", "reasoning", "trained", "tools"}


@dataclass
class TokenizedExample:
    input_ids: list[int]
    target: list[bool]  # True on each token a trained turn generates (see the module docstring)
    end_of_turn: list[bool]  # True on the end-of-turn token of each trained turn (never masked)
    truncated: bool = False
    # Per trained turn: its message index, token range [start, end), end-of-turn token, and
    # how its reasoning and tool calls were handled (for `curate preview`).
    turns: list[dict] = field(default_factory=list)


@dataclass
class _Piece:
    """A stretch of text: template text (`index` None) or message `index`'s content/reasoning."""

    text: str
    index: int | None = None
    kind: str = "template"  # template, content, reasoning


@dataclass
class _Turn:
    index: int
    start: int  # character where the model starts generating (end of its generation prompt)
    end: int  # character after its end-of-turn token
    end_token: str
    reasoning: str  # trained (the trace is a target), dropped (--reasoning drop), none (the turn has none)
    tool_calls: int


class ChatTokenizer:
    """Wraps a Hugging Face tokenizer that has a chat template (and a fast backend, for offsets).

    system_prompt: `keep` passes system messages to the template, `merge` folds them into the
    first user turn (for templates without a system role, such as Gemma-2), `drop` removes them.
    train_turns: `all` assistant turns are targets, or only the `last`; a message with
    `weight: 0` (Axolotl's per-message flag) is never a target. Untrained turns stay context.
    reasoning: `keep` trains reasoning traces with their answers; `drop` trains answers only.
    """

    def __init__(self, tokenizer, max_length: int | None = None, truncate: bool = False,
                 system_prompt: str = "keep", train_turns: str = "all", reasoning: str = "keep"):
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template; give a chat (instruct) model")
        if not tokenizer.is_fast:
            raise ValueError("a fast tokenizer (tokenizer.json) is needed to map text to tokens")
        if system_prompt not in SYSTEM_PROMPT_POLICIES:
            raise ValueError(f"--system-prompt is one of {', '.join(SYSTEM_PROMPT_POLICIES)}, not {system_prompt!r}")
        if train_turns not in TRAIN_TURNS:
            raise ValueError(f"--train-turns is one of {', '.join(TRAIN_TURNS)}, not {train_turns!r}")
        if reasoning not in REASONING_POLICIES:
            raise ValueError(f"--reasoning is one of {', '.join(REASONING_POLICIES)}, not {reasoning!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncate = truncate
        self.system_prompt = system_prompt
        self.train_turns = train_turns
        self.reasoning = reasoning
        self._markers = _MarkerTokenizer.of(tokenizer)
        self._rows_checked = 0
        self._lock = threading.Lock()
        # The thinking switch of the row being rendered (templates read `enable_thinking` or
        # `thinking`): on for a row with reasoning kept, off with --reasoning drop, else the template's default.
        self._row = threading.local()
        self.end_of_turn_tokens, self.end_of_turn_id = self._find_end_of_turn()

    def __getstate__(self) -> dict:
        """Picklable (a Ray replica prepares its own rows): the lock and the per-thread row are not state."""
        return {key: value for key, value in self.__dict__.items() if key not in ("_lock", "_row")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._row = threading.local()

    @property
    def end_of_turn_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.end_of_turn_id)

    def options(self) -> dict:
        """What decides the targets, for the manifest (a resumed run must use the same)."""
        return {"system_prompt": self.system_prompt, "train_turns": self.train_turns, "reasoning": self.reasoning,
                "end_of_turn": {"id": self.end_of_turn_id, "token": self.end_of_turn_token},
                "end_of_turn_tokens": sorted(self.end_of_turn_tokens)}

    # ------------------------------------------------------------ rendering

    def render(self, messages: list[dict], add_generation_prompt: bool = False, row: int = -1,
               tools: list | None = None) -> str:
        """The template's text; a template that refuses the conversation raises `RowError`."""
        from jinja2 import TemplateError

        thinking = getattr(self._row, "thinking", None)
        switches = {} if thinking is None else {"enable_thinking": thinking, "thinking": thinking}
        try:
            return self.tokenizer.apply_chat_template(
                [_template_message(m) for m in messages], tools=tools, tokenize=False,
                add_generation_prompt=add_generation_prompt, **switches)
        except (TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            raise RowError(row, f"the chat template refused this conversation: {error}", field="messages") from None

    def conversation(self, row: int, messages: list[dict]) -> list[dict]:
        """The messages as the template gets them, after the --system-prompt policy."""
        return apply_system_prompt(row, messages, self.system_prompt)

    def prompt_ids(self, messages: list[dict], row: int = -1) -> list[int]:
        """Token ids of a prompt ready for the model to answer (generation prompt added)."""
        tools = _tools_of(messages)
        self._row.thinking = False if self.reasoning == "drop" else None
        messages = [self._for_template(m, reasoning=False) for m in self.conversation(row, messages)]
        pieces = self._layout(row, messages, add_generation_prompt=True, tools=tools)
        return self._markers.encode(pieces, [])[0]

    # ------------------------------------------------------------ targets

    def encode(self, row: int, messages: list[dict]) -> TokenizedExample:
        """The row's ids and targets. Marks each of `messages` with `trained` (True/False)."""
        tools = _tools_of(messages)
        conversation = self.conversation(row, messages)
        trained = self._trained_turns(conversation)
        for message in messages:
            message["trained"] = any(message is conversation[i] for i in trained)
        if not trained:
            raise RowError(row, "no assistant turn is trained (every one has weight 0, or there is none)", field="messages")
        last = trained[-1]
        conversation = conversation[:last + 1]
        if self.reasoning == "drop":
            self._row.thinking = False
        else:
            self._row.thinking = True if any(split_reasoning(conversation[i])[0] is not None for i in trained) else None
        pieces, turns = self._last_turn(row, conversation, last, tools)
        turns = self._earlier_turns(row, conversation, trained[:-1], tools, pieces, turns[0].start) + turns
        boundaries = [turn.start for turn in turns]
        input_ids, offsets, text = self._markers.encode(pieces, boundaries)
        self._check_row(pieces)
        target, end_of_turn = [False] * len(input_ids), [False] * len(input_ids)
        spans = []
        for turn in turns:
            first = last_token = None
            for token, (start, end) in enumerate(offsets):
                if start >= turn.start and end <= turn.end and end > start:
                    target[token] = True
                    first = token if first is None else first
                    last_token = token
            if last_token is None or text[offsets[last_token][0]:offsets[last_token][1]] != turn.end_token:
                raise RowError(row, "the end-of-turn token of this turn is not a token of its own", field=f"messages[{turn.index}]")
            end_of_turn[last_token] = True
            spans.append({"message": turn.index, "tokens": [first, last_token + 1], "end_of_turn": turn.end_token,
                          "reasoning": turn.reasoning, "tool_calls": turn.tool_calls})
        return self._limit(row, TokenizedExample(input_ids, target, end_of_turn, turns=spans))

    def _trained_turns(self, messages: list[dict]) -> list[int]:
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
        return turns[-1:] if self.train_turns == "last" else turns

    # ------------------------------------------------------------ the last trained turn

    def _last_turn(self, row: int, conversation: list[dict], last: int, tools) -> tuple[list[_Piece], list[_Turn]]:
        """The pieces of the whole sequence (the last trained turn's generation prompt, then what
        the model generates after it, then the template's text to the end of that turn), and that turn."""
        message = conversation[last]
        reasoning, answer, literal = split_reasoning(message)
        keep = self.reasoning == "keep" and reasoning is not None
        context = [self._for_template(m, reasoning=self.reasoning == "keep") for m in conversation[:last]]
        prompt = self._layout(row, context, add_generation_prompt=True, tools=tools)
        prompt_text = _text(prompt)
        think_open = _THINK_OPEN_AT_END.search(prompt_text)
        tool_calls = len(_tool_calls(message))

        plain = {k: v for k, v in message.items() if k not in ("reasoning", "reasoning_content", "thinking")}
        attempts = []
        if keep:  # as fields (Qwen3, gpt-oss), else as the literal think block (QwQ's last turn; plain templates)
            attempts.append(({**plain, "content": answer, "reasoning_content": reasoning, "thinking": reasoning}, "fields"))
            attempts.append(({**plain, "content": literal}, "literal"))
        else:
            attempts.append(({**plain, "content": answer}, "answer"))
        refusal = None
        for attempt, how in attempts:
            try:
                pieces = self._layout(row, [*context, attempt], tools=tools)
            except RowError as error:
                refusal = refusal or error
                continue
            if not _text(pieces).startswith(prompt_text):
                continue
            if how == "fields" and not any(p.kind == "reasoning" and p.index == last for p in pieces):
                continue  # the template ignores the reasoning fields
            after = _split_at(pieces, len(prompt_text))[1]
            if how == "literal":
                located = [k for k, p in enumerate(after) if p.index == last and p.kind == "content"]
                if not located or "</think>" in _text(after[:located[0]]):
                    continue  # the trace left out, or put after a think block of the template's own
            state = "trained" if keep else ("dropped" if reasoning is not None else "none")
            return self._finish(row, message, prompt, after, last, len(prompt_text), state, tool_calls)
        if think_open or _THINK_CLOSED_AT_END.search(prompt_text):
            if keep and not think_open:
                raise RowError(row, "the chat template's generation prompt closes the think block, so this turn's "
                                    "reasoning cannot be trained as the model would write it (--reasoning drop trains "
                                    "the answer)", field=f"messages[{last}]")
            return self._synthesise(row, conversation, context, prompt, last, answer, literal if keep else None,
                                    think_open.group(1) if think_open else None, tools, tool_calls, reasoning is not None)
        if refusal is not None:
            raise refusal
        if keep:
            raise RowError(row, "the chat template neither takes this turn's reasoning (as `reasoning_content`, "
                                "`thinking` or a think block) nor opens a think block for it, so the trace cannot be "
                                "trained as the model would write it (--reasoning drop trains the answer)",
                           field=f"messages[{last}]")
        hint = " (try --system-prompt merge)" if any(m["role"] == "system" for m in conversation) else ""
        raise RowError(row, "the chat template renders the conversation before this turn differently once the "
                            "conversation goes on, so the model would be trained on a context it never answers "
                            f"in{hint}", field=f"messages[{last}]")

    def _synthesise(self, row, conversation, context, prompt, last, answer, literal, think_space, tools, tool_calls,
                    had_reasoning):
        """The generation prompt opens a think block that the template's own rendering of this
        turn lacks (it drops traces): the turn is what the model writes after that prompt."""
        message = conversation[last]
        plain = {k: v for k, v in message.items() if k not in ("reasoning", "reasoning_content", "thinking")}
        pieces = self._layout(row, [*context, {**plain, "content": answer}], tools=tools)
        located = [k for k, p in enumerate(pieces) if p.index == last and p.kind == "content"]
        if not located:
            raise RowError(row, "the chat template leaves this assistant turn's answer out of the text", field=f"messages[{last}]")
        tail = pieces[located[-1] + 1:]  # the template's text after the answer: its end of turn
        answer_text = pieces[located[-1]].text
        prompt_text = _text(prompt)
        close = "\n</think>\n\n" if think_space else "</think>"
        if think_space is None:  # the prompt has closed the think block itself: the answer follows
            generated = [_Piece(answer_text.lstrip("\n"), last, "content")]
            context_close, state = [], "dropped" if had_reasoning else "none"
        elif literal is not None:
            body = re.sub(r"^\s*<think>", "", literal, count=1)
            if think_space and body.startswith(think_space):
                body = body[len(think_space):]
            generated = [_Piece(body, last, "content")]
            context_close, state = [], "trained"
        elif self.reasoning == "keep":
            generated = [_Piece(close), _Piece(answer_text.lstrip("\n"), last, "content")]
            context_close, state = [], "none"
        else:
            generated = [_Piece(answer_text.lstrip("\n"), last, "content")]
            context_close, state = [_Piece(close)], "dropped" if had_reasoning else "none"
        prompt = [*prompt, *context_close]
        start = len(prompt_text) + len(_text(context_close))
        return self._finish(row, message, prompt, [*generated, *tail], last, start, state, tool_calls)

    def _finish(self, row, message, prompt, after, index, start, reasoning, tool_calls) -> tuple[list[_Piece], list[_Turn]]:
        """The whole sequence's pieces and the trained turn that starts at `start`."""
        pieces = [*prompt, *after]
        end, token = self._end_of_turn(row, pieces, index, start, tool_calls)
        _check_calls_rendered(row, message, pieces, index, start, end)
        return pieces, [_Turn(index, start, end, token, reasoning, tool_calls)]

    # ------------------------------------------------------------ earlier trained turns

    def _earlier_turns(self, row, conversation, indices, tools, pieces, limit) -> list[_Turn]:
        """Each earlier trained turn, where the sequence holds it as the model generates it
        after its own generation prompt."""
        turns = []
        text = _text(pieces)
        for index in indices:
            message = conversation[index]
            reasoning, _, _ = split_reasoning(message)
            context = [self._for_template(m, reasoning=self.reasoning == "keep") for m in conversation[:index]]
            prompt = self.render(context, add_generation_prompt=True, row=row, tools=tools)
            if not text.startswith(prompt) or len(prompt) > limit:
                if _THINK_OPEN_AT_END.search(prompt) or _THINK_CLOSED_AT_END.search(prompt):
                    raise RowError(row, "the chat template puts a think block before each answer but renders earlier "
                                        "answers without it, so this earlier turn cannot be trained in the context "
                                        "the model answers it in (pass --train-turns last: earlier turns are then "
                                        "context)", field=f"messages[{index}]")
                hint = " (try --system-prompt merge)" if any(m["role"] == "system" for m in conversation) else ""
                raise RowError(row, "the chat template renders the conversation before this turn differently once "
                                    "the conversation goes on, so the model would be trained on a context it never "
                                    f"answers in{hint}", field=f"messages[{index}]")
            kept = self.reasoning == "keep" and reasoning is not None
            if kept and not any(p.index == index and p.kind == "reasoning" for p in pieces) and \
                    reasoning.strip() not in _text([p for p in pieces if p.index == index]):
                raise RowError(row, "the chat template drops the reasoning of earlier turns, so this turn cannot be "
                                    "trained with its reasoning in the context the model answers it in (pass "
                                    "--train-turns last, or --reasoning drop)", field=f"messages[{index}]")
            tool_calls = len(_tool_calls(message))
            end, token = self._end_of_turn(row, pieces, index, len(prompt), tool_calls)
            _check_calls_rendered(row, message, pieces, index, len(prompt), end)
            state = "trained" if kept else ("dropped" if reasoning is not None else "none")
            turns.append(_Turn(index, len(prompt), end, token, state, tool_calls))
        return turns

    # ------------------------------------------------------------ end of turn

    def _end_of_turn(self, row: int, pieces: list[_Piece], index: int, start: int, tool_calls: int) -> tuple[int, str]:
        """(character after, text) of the token that ends turn `index`: the special token right
        after its content, or, after a tool call, the first end-of-turn token."""
        position, contents_after = 0, []
        content_end, spans = None, []
        for piece in pieces:
            if piece.index == index and piece.kind == "content" and position + len(piece.text) >= start:
                content_end = position + len(piece.text)
            elif piece.index is not None and piece.index > index:
                contents_after.append(position)
            if piece.index is None:
                spans.append((position, piece.text))
            position += len(piece.text)
        search_from = max(start, content_end if content_end is not None else start)
        boundary = min(contents_after, default=position)
        found = None
        for piece_start, piece_text in spans:
            if piece_start + len(piece_text) <= search_from:
                continue
            offset = max(0, search_from - piece_start)
            for match in self._markers.pattern.finditer(piece_text, offset):
                token = match.group(0)
                right_after = piece_start + match.start() == search_from and content_end is not None and not tool_calls
                if right_after or token in self.end_of_turn_tokens:
                    found = (piece_start + match.end(), token)
                    break
            if found:
                break
        if found is None or found[0] > boundary:
            raise RowError(row, "the chat template puts no end-of-turn token after this assistant turn, so a model "
                                "trained on it could not learn to stop", field=f"messages[{index}]")
        return found

    def _find_end_of_turn(self) -> tuple[set[str], int]:
        """The template's end-of-turn tokens, from probe conversations (any of which the template
        may refuse: then the rows themselves tell), and the tokenizer's end of sequence."""
        found: list[str] = []
        user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "probe", "arguments": {"x": 1}}}]}
        probes = [[user, answer], [user, answer, {"role": "user", "content": "And?"}, answer],
                  [{"role": "system", "content": "Be brief."}, user, answer]]
        for probe in probes:
            try:
                pieces = self._layout(0, probe)
            except RowError:
                continue
            self._markers.check(_text(pieces), "the chat template's probe conversation")
            for k, piece in enumerate(pieces):
                if piece.kind == "content" and probe[piece.index]["role"] == "assistant" and k + 1 < len(pieces):
                    match = self._markers.pattern.match(pieces[k + 1].text)
                    if match and pieces[k + 1].index is None:
                        found.append(match.group(0))
        try:
            text = self.render([user, call])
            markers = self._markers.pattern.findall(text)
            if markers:
                found.append(markers[-1])
        except RowError:
            pass
        eos = self.tokenizer.eos_token
        tokens = set(found) | ({eos} if eos in self._markers.names else set())
        main = found[0] if found else eos
        if main is None:
            raise ValueError("the tokenizer has no end-of-sequence token and the chat template rendered no probe "
                             "conversation, so no end-of-turn token can be known")
        return tokens, self.tokenizer.convert_tokens_to_ids(main)

    # ------------------------------------------------------------ layout

    def _for_template(self, message: dict, reasoning: bool) -> dict:
        """A message as the template gets it: reasoning in the fields templates read (or none)."""
        if message["role"] != "assistant":
            return message
        found, answer, _ = split_reasoning(message)
        if found is None:
            return message
        out = {k: v for k, v in message.items() if k not in ("reasoning", "reasoning_content", "thinking")}
        out["content"] = answer
        if reasoning:
            out["reasoning_content"] = out["thinking"] = found
        return out

    def _layout(self, row: int, messages: list[dict], add_generation_prompt: bool = False,
                tools: list | None = None) -> list[_Piece]:
        """The rendered text as template pieces and located message contents (and reasoning),
        checked to rebuild the real rendering exactly; see the module docstring."""
        text = self.render(messages, add_generation_prompt=add_generation_prompt, row=row, tools=tools)
        placeholders = []
        for i, m in enumerate(messages):
            m = dict(m)
            if isinstance(m.get("content"), str) and m["content"]:
                m["content"] = _PLACEHOLDER.format(i)
            for key in ("reasoning_content", "thinking"):
                if isinstance(m.get(key), str) and m[key]:
                    m[key] = _PLACEHOLDER.format(_REASONING_SLOT + i)
            placeholders.append(m)
        layout = self.render(placeholders, add_generation_prompt=add_generation_prompt, row=row, tools=tools)
        parts = _PLACEHOLDER_RE.split(layout)  # template, slot, template, slot, ..., template
        pieces: list[_Piece] = []
        position = 0
        for k, part in enumerate(parts):
            if k % 2 == 0:
                if not text.startswith(part, position):
                    raise RowError(row, "the chat template changes the message text in a way that cannot be "
                                        "located exactly (only trimming is understood)", field="messages")
                if part:
                    pieces.append(_Piece(part))
                position += len(part)
                continue
            slot = int(part)
            index, kind = (slot - _REASONING_SLOT, "reasoning") if slot >= _REASONING_SLOT else (slot, "content")
            value = messages[index]["reasoning_content" if kind == "reasoning" and "reasoning_content" in messages[index]
                                    else "thinking" if kind == "reasoning" else "content"]
            following = parts[k + 1]
            # as is, trimmed, or JSON-escaped inside the template's quotes (`content|tojson`)
            for rendered in dict.fromkeys([value, value.strip(), value.lstrip(), value.rstrip(), value.strip("\n"),
                                           json.dumps(value, ensure_ascii=False)[1:-1]]):
                if text.startswith(rendered, position) and text.startswith(following, position + len(rendered)):
                    break
            else:
                raise RowError(row, "the chat template rewrites this message's text, so its tokens cannot be "
                                    "located exactly", field=f"messages[{index}]")
            pieces.append(_Piece(rendered, index, kind))
            position += len(rendered)
        if position != len(text):
            raise RowError(row, "the chat template's text does not match its layout", field="messages")
        return pieces

    # ------------------------------------------------------------ checks and limits

    def _check_row(self, pieces: list[_Piece]) -> None:
        """On the first rows of a run: curate's tokenization of the row's text, where no content
        holds a special token's text, must be the model tokenizer's own."""
        with self._lock:
            if self._rows_checked >= _ROWS_CHECKED:
                return
            self._rows_checked += 1
        if any(p.index is not None and self._markers.pattern.search(p.text) for p in pieces):
            return
        self._markers.check(_text(pieces))

    def _limit(self, row: int, example: TokenizedExample) -> TokenizedExample:
        if self.max_length is None or len(example.input_ids) <= self.max_length:
            return example
        if not self.truncate:
            raise RowError(row, f"{len(example.input_ids)} tokens is over --max-length {self.max_length} "
                                "(pass --truncate to keep the first --max-length tokens)")
        n = self.max_length
        example = TokenizedExample(example.input_ids[:n], example.target[:n], example.end_of_turn[:n], truncated=True,
                                   turns=[t for t in example.turns if t["tokens"][0] < n])
        if not any(example.target):
            raise RowError(row, f"no response token within the first {self.max_length} tokens (--max-length)")
        return example


class _MarkerTokenizer:
    """Tokenizes rendered pieces so that only the template's own text yields special tokens.

    A copy of the fast tokenizer knows every special token under a private name; template
    pieces have their special-token strings rewritten to those names, contents are left as
    they are (so `</s>` written in an answer stays the text `</s>`). Reloading the copy gives
    its added tokens new ids (DeepSeek-V3's specials 0-2 are also vocabulary entries, and
    every later added token moves up): every added token's id is mapped back to the model's
    own, and the copy is checked to give the model tokenizer's own ids before it is used."""

    _made = weakref.WeakKeyDictionary()  # tokenizer -> its copy: built and checked once

    @classmethod
    def of(cls, tokenizer) -> _MarkerTokenizer:
        try:
            return cls._made[tokenizer]
        except (KeyError, TypeError):
            pass
        made = cls(tokenizer)
        try:
            cls._made[tokenizer] = made
        except TypeError:
            pass
        return made

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        self.original = tokenizer.backend_tokenizer
        backend = json.loads(self.original.to_str())
        specials = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
        specials.update(tokenizer.all_special_tokens)
        self.names = {}  # special-token text -> its private name (only tokens the backend splits out)
        originals = {}  # name in the copy -> the model's id
        for added in backend.get("added_tokens", []):
            content = added["content"]
            if content in specials:
                self.names[content] = _SENTINEL.format(added["id"])
                added["content"] = self.names[content]
            originals[added["content"]] = added["id"]
        self.backend = Tokenizer.from_str(json.dumps(backend))
        # The same, for text that goes on from ordinary text: no space prepended at its start
        # (Phi-3's normaliser prepends "▁" to every stretch between special tokens).
        within = _without_prepend(backend)
        self.backend_within = self.backend if within is backend else Tokenizer.from_str(json.dumps(within))
        for copy in {id(self.backend): self.backend, id(self.backend_within): self.backend_within}.values():
            copy.no_truncation()
            copy.no_padding()
        self._to_model = {}
        for name, model_id in originals.items():
            copy_id = self.backend.token_to_id(name)
            if copy_id is None:
                raise ValueError(f"curate's copy of the tokenizer lost the added token {name!r}; refusing to guess its id")
            self._to_model[copy_id] = model_id
        # Longest first, as the tokenizer itself matches added tokens.
        self.pattern = re.compile("|".join(re.escape(s) for s in sorted(self.names, key=len, reverse=True)) or "(?!)")
        self._private = re.compile("|".join(re.escape(s) for s in self.names.values()) or "(?!)")
        self._continue = next(iter(self.names.values()), None)  # a private name: a segment starts after it
        self._check_at_load(tokenizer)

    def _ids(self, encoding) -> list[int]:
        return [self._to_model.get(i, i) for i in encoding.ids]

    def encode(self, pieces: list[_Piece], boundaries: list[int]) -> tuple[list[int], list[tuple[int, int]], str]:
        """Token ids (the model's), their character offsets in the rendered text, and that text.
        Tokenization starts afresh at each boundary (where a trained turn starts), as at
        inference, where the prompt is tokenized on its own and the model generates the rest."""
        text = _text(pieces)
        cuts = sorted({b for b in boundaries if 0 < b < len(text)})
        ids, offsets = [], []
        for start, end in zip([0, *cuts], [*cuts, len(text)]):
            before, segment = _split_at(_split_at(pieces, end)[0], start)
            after_special = not before or bool(re.search(f"(?:{self.pattern.pattern})\\Z", _text(before[-1:]))) \
                and before[-1].index is None
            segment_ids, segment_offsets = self._encode_segment(self.marked(segment), continuation=start > 0,
                                                                after_special=after_special)
            # offsets in the marked text, mapped back to the rendered text (private names are longer)
            position = _offset_map(segment, self.pattern, self.names)
            ids.extend(segment_ids)
            offsets.extend((start + position[a], start + position[b]) for a, b in segment_offsets)
        return ids, offsets, text

    def _encode_segment(self, marked: str, continuation: bool, after_special: bool = False
                        ) -> tuple[list[int], list[tuple[int, int]]]:
        """A continuation segment is tokenized as the tokenizer goes on in one pass: after a
        special token (a private name put before it), or within ordinary text (no prepended space)."""
        if not continuation or self._continue is None:
            encoding = self.backend.encode(marked, add_special_tokens=False)
            return self._ids(encoding), list(encoding.offsets)
        # Only the stretch before the segment's first special token goes on from the text before;
        # after a special token the tokenizer starts afresh, as in one pass.
        first_special = self._private.search(marked)
        cut = first_special.start() if first_special else len(marked)
        shift = len(self._continue)
        backend = self.backend if after_special else self.backend_within
        encoding = backend.encode(self._continue + marked[:cut], add_special_tokens=False)
        pairs = [(i, (a - shift, b - shift)) for i, (a, b) in zip(self._ids(encoding), encoding.offsets) if b > shift]
        if cut < len(marked):
            rest = self.backend.encode(marked[cut:], add_special_tokens=False)
            pairs += [(i, (a + cut, b + cut)) for i, (a, b) in zip(self._ids(rest), rest.offsets)]
        return [i for i, _ in pairs], [o for _, o in pairs]

    def marked(self, pieces: list[_Piece]) -> str:
        """The text the copy tokenizes: special-token strings in template text under private names."""
        return "".join(self.pattern.sub(lambda m: self.names[m.group(0)], p.text) if p.index is None else p.text
                       for p in pieces)

    def check(self, text: str, what: str = "a row") -> None:
        """The copy, on `text` with its special tokens as template markers, gives the model's own ids."""
        ours = self._ids(self.backend.encode(self.pattern.sub(lambda m: self.names[m.group(0)], text),
                                             add_special_tokens=False))
        own = self.original.encode(text, add_special_tokens=False).ids
        if ours != own:
            first = next((k for k, (a, b) in enumerate(zip(ours, own)) if a != b), min(len(ours), len(own)))
            raise ValueError(f"curate's token ids for {what} differ from the model tokenizer's own (first at token "
                             f"{first}: {ours[first:first + 5]} vs {own[first:first + 5]}); refusing to score with "
                             "ids that are not the model's")

    def _check_at_load(self, tokenizer) -> None:
        """The tokenizer as loaded is its tokenizer.json; every added token, and a sample of
        control-free text, gets the model's own ids."""
        from tokenizers import Tokenizer

        file = Path(getattr(tokenizer, "name_or_path", "") or "") / "tokenizer.json"
        if file.is_file():
            sample = "Is 7 prime?\n\n  Yes, naïve café 👋🏽 — def f(x):\n\treturn x"
            if Tokenizer.from_file(str(file)).encode(sample, add_special_tokens=False).ids != \
                    self.original.encode(sample, add_special_tokens=False).ids:
                raise ValueError(f"transformers loads {file.parent}'s tokenizer as {type(tokenizer).__name__} (the "
                                 "tokenizer_class of its tokenizer_config.json), which tokenizes differently from its "
                                 "tokenizer.json: the ids would not be the model's. Set \"tokenizer_class\": "
                                 "\"PreTrainedTokenizerFast\" in tokenizer_config.json to load tokenizer.json as it is")
        contents = [token.content for token in tokenizer.added_tokens_decoder.values()]
        ours = self.backend.encode_batch([self.pattern.sub(lambda m: self.names[m.group(0)], c) for c in contents],
                                         add_special_tokens=False)
        own = self.original.encode_batch(contents, add_special_tokens=False)
        for content, a, b in zip(contents, ours, own):
            if self._ids(a) != b.ids:
                raise ValueError(f"curate's id for the token {content!r} is {self._ids(a)}, the model tokenizer's is "
                                 f"{b.ids}; refusing to score with ids that are not the model's")
        sample = ("Hello, world! def f(x):\n    return x ** 2\n\n\t1 234 5678 — naïve café, "
                  "こんにちは 世界 👋🏽 Привет مرحبا\r\n  trailing   spaces ")
        self.check(sample, "a sample text")
        if self._continue is not None:
            # A segment tokenized after a boundary is the same as in one pass where no token straddles it.
            for before, after in (("Answer:", " yes"), ("x\n", "def f():\n    pass"), ("Hi", "! 123")):
                whole = self.backend.encode(before + after, add_special_tokens=False)
                if any(a < len(before) < b for a, b in whole.offsets):
                    continue
                split = self._ids(self.backend.encode(before, add_special_tokens=False)) + \
                    self._encode_segment(after, continuation=True)[0]
                special = next(iter(self.names))
                after_special = self._ids(self.backend.encode(self.names[special] + after, add_special_tokens=False))
                split_after_special = self._ids(self.backend.encode(self.names[special], add_special_tokens=False)) + \
                    self._encode_segment(after, continuation=True, after_special=True)[0]
                if split != self._ids(whole) or split_after_special != after_special:
                    raise ValueError("curate cannot tokenize an answer from its prompt's end exactly as this "
                                     "tokenizer does in one pass; refusing to guess ids")


def _without_prepend(backend: dict) -> dict:
    """A tokenizer.json that prepends no space at the start of a text (normaliser `Prepend`,
    `Metaspace`'s prepend scheme, `ByteLevel`'s prefix space); `backend` itself where it prepends none."""
    pipeline = {key: backend.get(key) for key in ("normalizer", "pre_tokenizer")}
    stripped = json.loads(json.dumps(pipeline))

    def strip(component):
        if not isinstance(component, dict):
            return component
        if component.get("type") == "Prepend":
            return None
        if component.get("type") == "Metaspace":
            component["prepend_scheme"] = "never"
            component.pop("add_prefix_space", None)
        if component.get("type") == "ByteLevel":
            component["add_prefix_space"] = False
        for key in ("normalizers", "pretokenizers"):
            if isinstance(component.get(key), list):
                component[key] = [c for c in map(strip, component[key]) if c is not None]
        return component

    stripped = {key: strip(value) for key, value in stripped.items()}
    return backend if stripped == pipeline else {**backend, **stripped}


def _offset_map(pieces: list[_Piece], pattern: re.Pattern, names: dict[str, str]) -> list[int]:
    """For each character boundary of the marked text, the boundary in the rendered text."""
    positions, rendered = [], 0
    for piece in pieces:
        cursor = 0
        matches = pattern.finditer(piece.text) if piece.index is None else ()
        for match in matches:
            positions.extend(range(rendered + cursor, rendered + match.start()))
            positions.extend([rendered + match.start()] * len(names[match.group(0)]))
            cursor = match.end()
        positions.extend(range(rendered + cursor, rendered + len(piece.text)))
        rendered += len(piece.text)
    positions.append(rendered)
    return positions


def _text(pieces: list[_Piece]) -> str:
    return "".join(p.text for p in pieces)


def _split_at(pieces: list[_Piece], position: int) -> tuple[list[_Piece], list[_Piece]]:
    """The pieces before and after a character position (a piece across it is cut in two)."""
    before, after, offset = [], [], 0
    for piece in pieces:
        end = offset + len(piece.text)
        if end <= position:
            before.append(piece)
        elif offset >= position:
            after.append(piece)
        else:
            cut = position - offset
            before.append(_Piece(piece.text[:cut], piece.index, piece.kind))
            after.append(_Piece(piece.text[cut:], piece.index, piece.kind))
        offset = end
    return before, after


def split_reasoning(message: dict) -> tuple[str | None, str, str]:
    """(reasoning, answer, the turn as the model writes it) of an assistant message: reasoning
    from a `reasoning` field, or a `<think>…</think>` block opening the content. Without
    reasoning: (None, content, content)."""
    content = message.get("content") or ""
    if message["role"] != "assistant":
        return None, content, content
    reasoning = next((message[k] for k in ("reasoning", "reasoning_content", "thinking") if isinstance(message.get(k), str)
                      and message[k]), None)
    if reasoning is not None:
        return reasoning, content, f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}"
    # The separator after `</think>` belongs to the trace as written; a template given the
    # answer alone puts its own.
    block = _THINK_BLOCK.match(content)
    if block:
        return block.group(1).strip("\n"), block.group(2).lstrip("\n"), content
    closed = _THINK_CLOSE.match(content)
    if closed and "<think>" not in content:  # the opening marker was the generation prompt's
        return closed.group(1).strip("\n"), closed.group(2).lstrip("\n"), "<think>\n" + content.lstrip("\n")
    return None, content, content


def _check_calls_rendered(row: int, message: dict, pieces: list[_Piece], index: int, start: int, end: int) -> None:
    """A turn's tool calls are in what it trains, or the row is rejected: never trained as text only."""
    calls = [_template_call(call) for call in _tool_calls(message)]
    generated = _text(pieces)[start:end]
    missing = [c["function"]["name"] for c in calls if c["function"]["name"] not in generated]
    if missing:
        raise RowError(row, f"the chat template does not write this turn's tool call ({', '.join(missing)}), so it "
                            "would be trained as its text alone", field=f"messages[{index}].tool_calls")


def _tool_calls(message: dict) -> list:
    calls = message.get("tool_calls") or []
    return json.loads(calls) if isinstance(calls, str) else calls


def _tools_of(messages: list[dict]) -> list | None:
    """The row's tool definitions (normalise puts them on a message: the row's `tools` field)."""
    for message in messages:
        if message.get("tools"):
            tools = message["tools"]
            return json.loads(tools) if isinstance(tools, str) else tools
    return None


def _template_message(message: dict) -> dict:
    """A message as templates expect it: curate's own keys removed, absent fields left out
    (templates test `'tool_calls' in message`), tool-call arguments as objects."""
    out = {k: v for k, v in message.items() if k not in _OWN_KEYS and (v is not None or k == "content")}
    if "tool_calls" in out:
        calls = json.loads(out["tool_calls"]) if isinstance(out["tool_calls"], str) else out["tool_calls"]
        out["tool_calls"] = [_template_call(call) for call in calls]
    return out


def _template_call(call: dict) -> dict:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {**call, "type": call.get("type") or "function", "function": function}


def apply_system_prompt(row: int, messages: list[dict], policy: str) -> list[dict]:
    """`keep` as is; `merge` folds system messages into the first user turn; `drop` removes them."""
    if policy == "keep" or not any(m["role"] == "system" for m in messages):
        return messages
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    if policy == "drop":
        return rest
    first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first_user is None:
        raise RowError(row, "--system-prompt merge needs a user turn to merge the system prompt into", field="messages")
    rest[first_user] = {**rest[first_user], "content": f"{system}\n\n{rest[first_user]['content']}"}
    return rest
