"""Render a conversation with the model's chat template and find the tokens trained on.

The target tokens are exactly the tokens of each assistant turn's content, plus the
end-of-turn token that the template puts right after it (a model that never trains on it
never learns to stop). These ids are what the scorer scores and what Axolotl trains on, so
the export is pre-tokenized: nothing re-tokenises between scoring and training.
"""

from __future__ import annotations

from dataclasses import dataclass

from curate.data import RowError


@dataclass
class TokenizedExample:
    input_ids: list[int]
    target: list[bool]  # True where the token is assistant content (or its end-of-turn token)
    truncated: bool = False


class ChatTokenizer:
    """Wraps a Hugging Face tokenizer that has a chat template (and a fast backend, for offsets)."""

    def __init__(self, tokenizer, max_length: int | None = None, truncate: bool = False):
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template; give a chat (instruct) model")
        if not tokenizer.is_fast:
            raise ValueError("a fast tokenizer (tokenizer.json) is needed to map text to tokens")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncate = truncate
        self._special_ids = set(tokenizer.all_special_ids) | {
            token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
        }

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a prompt ready for the model to answer (generation prompt added)."""
        return self.tokenizer(self.render(messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]

    def encode(self, row: int, messages: list[dict]) -> TokenizedExample:
        text = self.render(messages)
        spans = self._assistant_char_spans(row, messages, text)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        target = [False] * len(input_ids)
        token = 0
        for start, end in spans:
            while token < len(input_ids) and offsets[token][0] < start:
                token += 1
            while token < len(input_ids) and offsets[token][0] < end:
                target[token] = True
                token += 1
            if token < len(input_ids) and input_ids[token] in self._special_ids:
                target[token] = True  # the template's end-of-turn token
                token += 1
        return self._limit(row, TokenizedExample(input_ids, target))

    def _assistant_char_spans(self, row: int, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Character spans of each assistant content in the rendered text. Each turn is
        located after the rendering of the conversation up to it, so a user turn that
        quotes the answer cannot be mistaken for it."""
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:index], add_generation_prompt=True) if index else ""
            cursor = len(prefix) if text.startswith(prefix) else (spans[-1][1] if spans else 0)
            content = message["content"]
            start = text.find(content, cursor)
            if start < 0:  # templates such as Llama-3's trim the content
                content = content.strip()
                start = text.find(content, cursor)
            if start < 0:
                raise RowError(row, "the chat template changed the assistant text beyond recognition", field=f"messages[{index}]")
            spans.append((start, start + len(content)))
        return spans

    def _limit(self, row: int, example: TokenizedExample) -> TokenizedExample:
        if self.max_length is None or len(example.input_ids) <= self.max_length:
            return example
        if not self.truncate:
            raise RowError(row, f"{len(example.input_ids)} tokens is over --max-length {self.max_length} "
                                "(pass --truncate to keep the first --max-length tokens)")
        example = TokenizedExample(example.input_ids[: self.max_length], example.target[: self.max_length], truncated=True)
        if not any(example.target):
            raise RowError(row, f"no response token within the first {self.max_length} tokens (--max-length)")
        return example
