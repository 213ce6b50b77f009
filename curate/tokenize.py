"""Render a conversation with the model's chat template and find the tokens trained on.

The target tokens are exactly the tokens of each trained assistant turn's content, plus the
end-of-turn token that the template puts right after it (a model that never trains on it
never learns to stop). These ids are what the scorer scores and what Axolotl trains on, so
the export is pre-tokenized: nothing re-tokenises between scoring and training.

How the spans are found, exactly, on any template:
1. The conversation is rendered twice: as it is, and with every message's content replaced
   by a placeholder. The placeholder rendering is the template's own text; putting each
   content back (as is, or trimmed, as Llama-3 and Gemma templates do) must give the real
   rendering character for character, or the row is rejected: we never guess a position.
2. Each trained assistant turn must follow the rendering of the conversation before it with
   the generation prompt, which is the context the model answers in. A template that
   re-renders earlier turns (Mistral moves the system prompt) fails this, and the row is
   rejected with the reason rather than trained on a context the model never sees.
3. The text is tokenized once, with the template's special-token markers recognised and the
   message contents never turned into control tokens: a copy of the tokenizer knows each
   special token under a private name, which only the template's markers are rewritten to.
   One pass over the whole text keeps the tokenization identical to the model's own.
4. A token is a target if it overlaps a trained content, or the whitespace the template puts
   between the generation prompt and the content: SentencePiece's `▁Word` starts on
   the space the template puts before the answer, and the model must still learn to say it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from curate.data import RowError

SYSTEM_PROMPT_POLICIES = ("keep", "merge", "drop")
TRAIN_TURNS = ("all", "last")

# Private-use code points: they pass every normaliser unchanged and no real text holds them.
_SENTINEL = "\ue000{}\ue001"
_PLACEHOLDER = "\ue002{}\ue003"
_PLACEHOLDER_RE = re.compile("\ue002(\\d+)\ue003")


@dataclass
class TokenizedExample:
    input_ids: list[int]
    target: list[bool]  # True where the token is trained assistant content or its end-of-turn token
    end_of_turn: list[bool]  # True on the end-of-turn token after a trained turn (never masked)
    truncated: bool = False


class ChatTokenizer:
    """Wraps a Hugging Face tokenizer that has a chat template (and a fast backend, for offsets).

    system_prompt: `keep` passes system messages to the template, `merge` folds them into the
    first user turn (for templates without a system role, such as Gemma-2), `drop` removes them.
    train_turns: `all` assistant turns are targets, or only the `last`; a message with
    `weight: 0` (Axolotl's per-message flag) is never a target. Untrained turns stay context.
    """

    def __init__(self, tokenizer, max_length: int | None = None, truncate: bool = False,
                 system_prompt: str = "keep", train_turns: str = "all"):
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template; give a chat (instruct) model")
        if not tokenizer.is_fast:
            raise ValueError("a fast tokenizer (tokenizer.json) is needed to map text to tokens")
        if system_prompt not in SYSTEM_PROMPT_POLICIES:
            raise ValueError(f"--system-prompt is one of {', '.join(SYSTEM_PROMPT_POLICIES)}, not {system_prompt!r}")
        if train_turns not in TRAIN_TURNS:
            raise ValueError(f"--train-turns is one of {', '.join(TRAIN_TURNS)}, not {train_turns!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncate = truncate
        self.system_prompt = system_prompt
        self.train_turns = train_turns
        self._markers = _MarkerTokenizer(tokenizer)
        self.end_of_turn_id = self._find_end_of_turn()

    @property
    def end_of_turn_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.end_of_turn_id)

    def options(self) -> dict:
        """What decides the targets, for the manifest (a resumed run must use the same)."""
        return {"system_prompt": self.system_prompt, "train_turns": self.train_turns,
                "end_of_turn": {"id": self.end_of_turn_id, "token": self.end_of_turn_token}}

    # ------------------------------------------------------------ rendering

    def render(self, messages: list[dict], add_generation_prompt: bool = False, row: int = -1) -> str:
        """The template's text; a template that refuses the conversation raises `RowError`."""
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(_template_messages(messages), tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as error:
            raise RowError(row, f"the chat template refused this conversation: {error}", field="messages") from None

    def conversation(self, row: int, messages: list[dict]) -> list[dict]:
        """The messages as the template gets them, after the --system-prompt policy."""
        return apply_system_prompt(row, messages, self.system_prompt)

    def prompt_ids(self, messages: list[dict], row: int = -1) -> list[int]:
        """Token ids of a prompt ready for the model to answer (generation prompt added)."""
        messages = self.conversation(row, messages)
        text = self.render(messages, add_generation_prompt=True, row=row)
        pieces = self._pieces(row, messages, text, add_generation_prompt=True)
        return self._markers.encode(pieces)[0]

    # ------------------------------------------------------------ targets

    def encode(self, row: int, messages: list[dict]) -> TokenizedExample:
        messages = self.conversation(row, messages)
        trained = self._trained_turns(messages)
        if not trained:
            raise RowError(row, "no assistant turn is trained (every one has weight 0)", field="messages")
        text = self.render(messages, row=row)
        pieces = self._pieces(row, messages, text)
        spans = {index: (start, end) for index, start, end in _content_spans(pieces)}
        lead = {}
        for index in trained:
            if index not in spans:
                raise RowError(row, "the chat template leaves this assistant turn out of the text", field=f"messages[{index}]")
            lead[index] = self._check_context(row, messages, index, text, spans[index][0])
        input_ids, offsets, marked_spans = self._markers.encode(pieces)
        target, end_of_turn = [False] * len(input_ids), [False] * len(input_ids)
        for index in trained:
            start, end = marked_spans[index]
            last = self._mark_content(offsets, start - lead[index], end, target)
            if last + 1 < len(input_ids) and input_ids[last + 1] == self.end_of_turn_id:
                target[last + 1] = end_of_turn[last + 1] = True
        return self._limit(row, TokenizedExample(input_ids, target, end_of_turn))

    def _trained_turns(self, messages: list[dict]) -> list[int]:
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
        return turns[-1:] if self.train_turns == "last" else turns

    def _pieces(self, row: int, messages: list[dict], text: str, add_generation_prompt: bool = False) -> list[str | int]:
        """The rendered text as template strings and message indices (where a content goes),
        checked to rebuild `text` exactly; see the module docstring."""
        placeholders = [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
        layout = self.render(placeholders, add_generation_prompt=add_generation_prompt, row=row)
        parts = _PLACEHOLDER_RE.split(layout)  # template, index, template, index, ..., template
        pieces: list[str | int] = []
        position = 0
        for k, part in enumerate(parts):
            if k % 2 == 0:
                if not text.startswith(part, position):
                    raise RowError(row, "the chat template changes the message text in a way that cannot be "
                                        "located exactly (only trimming is understood)", field="messages")
                pieces.append(part)
                position += len(part)
                continue
            index = int(part)
            following = parts[k + 1]
            content = messages[index]["content"]
            for rendered in dict.fromkeys([content, content.strip(), content.lstrip(), content.rstrip()]):
                if text.startswith(rendered, position) and text.startswith(following, position + len(rendered)):
                    break
            else:
                raise RowError(row, "the chat template rewrites this message's text, so its tokens cannot be "
                                    "located exactly", field=f"messages[{index}]")
            pieces.extend([index, rendered])
            position += len(rendered)
        if position != len(text):
            raise RowError(row, "the chat template's text does not match its layout", field="messages")
        return pieces

    def _check_context(self, row: int, messages: list[dict], index: int, text: str, start: int) -> int:
        """An assistant turn is trained only in the context the model answers it in. Returns
        how many characters of whitespace the template puts between that context and the
        content (Mistral's space after `[/INST]`): the model writes them, so they are trained."""
        if index == 0:
            return 0
        prompt = self.render(messages[:index], add_generation_prompt=True, row=row)
        if not (text.startswith(prompt) and len(prompt) <= start):
            hint = " (try --system-prompt merge)" if any(m["role"] == "system" for m in messages) else ""
            raise RowError(row, "the chat template renders the conversation before this turn differently once the "
                                "conversation goes on, so the model would be trained on a context it never answers "
                                f"in{hint}", field=f"messages[{index}]")
        gap = text[len(prompt):start]
        return len(gap) if gap.isspace() else 0

    @staticmethod
    def _mark_content(offsets: list[tuple[int, int]], start: int, end: int, target: list[bool]) -> int:
        """Mark the tokens that overlap [start, end); returns the index of the last one."""
        last = -1
        for token, (token_start, token_end) in enumerate(offsets):
            if token_start >= end:
                break
            if token_end > start:
                target[token] = True
                last = token
        return last

    def _find_end_of_turn(self) -> int:
        """The token the template puts right after an assistant answer: one fact, from the template."""
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            text = self.render(messages)
            pieces = self._pieces(0, messages, text)
        except RowError as error:
            raise ValueError(f"cannot find the end-of-turn token of this chat template: {error.reason}") from None
        input_ids, offsets, spans = self._markers.encode(pieces)
        last = self._mark_content(offsets, *spans[1], [False] * len(input_ids))
        following = input_ids[last + 1] if last + 1 < len(input_ids) else None
        if following not in self._markers.special_ids:
            raise ValueError("this chat template puts no special token right after an assistant answer, so a model "
                             "trained on it could not learn to stop")
        return following

    def _limit(self, row: int, example: TokenizedExample) -> TokenizedExample:
        if self.max_length is None or len(example.input_ids) <= self.max_length:
            return example
        if not self.truncate:
            raise RowError(row, f"{len(example.input_ids)} tokens is over --max-length {self.max_length} "
                                "(pass --truncate to keep the first --max-length tokens)")
        n = self.max_length
        example = TokenizedExample(example.input_ids[:n], example.target[:n], example.end_of_turn[:n], truncated=True)
        if not any(example.target):
            raise RowError(row, f"no response token within the first {self.max_length} tokens (--max-length)")
        return example


class _MarkerTokenizer:
    """Tokenizes rendered pieces so that only the template's own text yields special tokens.

    A copy of the fast tokenizer knows every special token under a private name; template
    pieces have their special-token strings rewritten to those names, contents are left as
    they are (so `</s>` written in an answer stays the text `</s>`). The ids of the private
    names are mapped back to the real ones."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        specials = {token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
        specials.update({token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens})
        self.special_ids = set(specials.values())
        self._names = {}  # special-token text -> its private name (only tokens the backend splits out)
        for added in backend.get("added_tokens", []):
            if added["content"] in specials:
                private = _SENTINEL.format(added["id"])
                self._names[added["content"]] = private
                added["content"] = private
        self.backend = Tokenizer.from_str(json.dumps(backend))
        self.backend.no_truncation()
        self.backend.no_padding()
        self._private_ids = {self.backend.token_to_id(_SENTINEL.format(i)): i for i in self.special_ids}
        self._private_ids.pop(None, None)
        # Longest first, as the tokenizer itself matches added tokens.
        self._pattern = re.compile("|".join(re.escape(s) for s in sorted(self._names, key=len, reverse=True)) or "(?!)")

    def text(self, pieces: list[str | int]) -> tuple[str, dict[int, tuple[int, int]]]:
        """The text the copy tokenizes, and where each message's content lies in it."""
        out, spans, position, content_of = [], {}, 0, None
        for piece in pieces:
            if isinstance(piece, int):
                content_of = piece
                continue
            if content_of is None:
                piece = self._pattern.sub(lambda match: self._names[match.group(0)], piece)
            else:
                spans[content_of] = (position, position + len(piece))
                content_of = None
            out.append(piece)
            position += len(piece)
        return "".join(out), spans

    def encode(self, pieces: list[str | int]) -> tuple[list[int], list[tuple[int, int]], dict[int, tuple[int, int]]]:
        """Token ids, their character offsets, and each content's character span (all in the copy's text)."""
        text, spans = self.text(pieces)
        encoding = self.backend.encode(text, add_special_tokens=False)
        return [self._private_ids.get(i, i) for i in encoding.ids], encoding.offsets, spans


def _content_spans(pieces: list[str | int]):
    """(message index, start, end) of each content in the rendered text."""
    position, index = 0, None
    for piece in pieces:
        if isinstance(piece, int):
            index = piece
            continue
        if index is not None:
            yield index, position, position + len(piece)
            index = None
        position += len(piece)


def _template_messages(messages: list[dict]) -> list[dict]:
    """Messages as templates expect them: curate's own keys (weight) removed."""
    return [{k: v for k, v in m.items() if k != "weight"} for m in messages]


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
