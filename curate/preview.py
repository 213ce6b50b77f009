"""`curate preview`: the first rows of a dataset rendered with a model's chat template, the
target tokens marked, before anything is scored. Needs the tokenizer only (no weights), so a
user checks their template and options in seconds rather than after GPU hours."""

from __future__ import annotations

import itertools
from pathlib import Path

from curate.data import Fields, read_in_chunks
from curate.tokenize import ChatTokenizer
from curate.view import token_texts


def preview(input_path: Path, chat_tokenizer: ChatTokenizer, fields: Fields = Fields(), limit: int = 3) -> list[dict]:
    """The first `limit` rows: each scored row's tokens (text, id, target, end_of_turn) and
    trained spans (message, token range, text, end-of-turn token, reasoning and tool-call
    handling), or each rejected row's reason, in input order."""
    tokenizer = chat_tokenizer.tokenizer
    out = []
    chunks = read_in_chunks(input_path, lambda example: chat_tokenizer.encode(example.row, example.messages),
                            fields, size=limit)
    for _, prepared, rejects in itertools.islice(chunks, 1):
        for example, encoded in prepared:
            texts = token_texts(encoded.input_ids, tokenizer)
            out.append({
                "row": example.row, "id": example.id, "tokens": len(encoded.input_ids), "target_tokens": sum(encoded.target),
                "truncated": encoded.truncated,
                "token_list": [{"id": i, "text": t, "target": g, "end_of_turn": e}
                               for i, t, g, e in zip(encoded.input_ids, texts, encoded.target, encoded.end_of_turn)],
                "spans": [{**turn, "text": "".join(texts[turn["tokens"][0]:turn["tokens"][1]])} for turn in encoded.turns],
            })
        out.extend({"row": r["row"], "rejected": r["reason"], "field": r["field"]} for r in rejects)
    return sorted(out, key=lambda item: item["row"])


def render_preview(items: list[dict], chat_tokenizer: ChatTokenizer, console) -> None:
    """Template and prompt tokens dim, trained tokens bold green, the end-of-turn token boxed.
    Without colour, trained text is shown [[like this]]."""
    from rich.text import Text

    plain = console.color_system is None
    ends = ", ".join(sorted(chat_tokenizer.end_of_turn_tokens))
    console.print(f"end-of-turn token: {chat_tokenizer.end_of_turn_token!r} (id {chat_tokenizer.end_of_turn_id}; "
                  f"a turn may end with any of {ends}) · --system-prompt {chat_tokenizer.system_prompt} · "
                  f"--train-turns {chat_tokenizer.train_turns} · --reasoning {chat_tokenizer.reasoning}",
                  highlight=False, markup=False)
    for item in items:
        if "rejected" in item:
            console.rule(f"row {item['row']}: rejected")
            console.print(f"{item['field'] or 'row'}: {item['rejected']}", highlight=False, markup=False)
            continue
        console.rule(f"id {item['id']} · row {item['row']} · {item['tokens']} tokens, {item['target_tokens']} trained")
        text, inside = Text(), False
        for token in item["token_list"]:
            if plain and token["target"] != inside:
                text.append("[[" if token["target"] else "]]")
                inside = token["target"]
            style = "bold reverse green" if token["end_of_turn"] else "bold green" if token["target"] else "dim"
            text.append(token["text"], style=None if plain else style)
        if plain and inside:
            text.append("]]")
        console.print(text, highlight=False, markup=False)
        for span in item["spans"]:
            start, end = span["tokens"]
            calls = f" · {span['tool_calls']} tool call{'s' * (span['tool_calls'] != 1)}" if span["tool_calls"] else ""
            console.print(f"  trained: messages[{span['message']}], tokens {start}-{end - 1}, ends with "
                          f"{span['end_of_turn']!r} · reasoning {span['reasoning']}{calls}: {span['text']!r}",
                          highlight=False, markup=False)
