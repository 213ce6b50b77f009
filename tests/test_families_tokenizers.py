"""The fetched chat-model tokenizers (`make tokenizers`, tests/fetch_tokenizers.py) are the real ones.

Checked against facts that do not come from the fetch: llama.cpp's golden test strings with the ids the
original Hugging Face tokenizers gave them, and each family's published special-token ids.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

import fetch_tokenizers
from conftest import FAMILIES

# llama.cpp's vocab tests: which golden file checks which family (Qwen2.5 and Qwen3 share one vocabulary).
GOLDEN = {
    "llama-3.1-instruct": "llama-bpe",
    "qwen2.5-instruct": "qwen2",
    "qwen3": "qwen2",
    "phi-3.5-mini-instruct": "phi-3",
}
SEPARATOR = "\n__ggml_vocab_test__\n"

SPECIAL_IDS = {
    "llama-3.1-instruct": {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
        "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
    },
    "gemma-2-it": {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 106, "<end_of_turn>": 107},
    "gemma-3-it": {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106},
    "mistral-7b-instruct-v0.3": {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "[TOOL_CALLS]": 5},
    "qwen2.5-instruct": {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<tool_call>": 151657},
    "qwen3": {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667, "</think>": 151668,
    },
    "phi-3.5-mini-instruct": {
        "<s>": 1, "</s>": 2, "<|endoftext|>": 32000, "<|assistant|>": 32001, "<|system|>": 32006, "<|end|>": 32007,
        "<|user|>": 32010,
    },
}


@cache
def load(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def read_golden(golden_dir: Path, vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's format: .inp has each string followed by a separator line, .out one line of ids per string.

    Read as bytes: text mode would turn a "\\r" inside a test string into "\\n".
    """
    stem = f"ggml-vocab-{vocab}.gguf"
    texts = (golden_dir / f"{stem}.inp").read_bytes().decode("utf-8").removesuffix(SEPARATOR).split(SEPARATOR)
    lines = (golden_dir / f"{stem}.out").read_bytes().decode("utf-8").removesuffix("\n").split("\n")
    assert len(texts) == len(lines), f"{stem}: {len(texts)} strings, {len(lines)} id lines"
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]


def test_every_family_fetched(family_tokenizers_dir):
    for family in FAMILIES:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (family_tokenizers_dir / family / name).is_file(), f"{family}/{name}"
    assert (family_tokenizers_dir / "PROVENANCE.md").is_file()
    assert set(SPECIAL_IDS) == set(FAMILIES)


@pytest.mark.parametrize("family", list(GOLDEN))
def test_llama_cpp_golden_strings(family_tokenizers_dir, family):
    tok = load(family_tokenizers_dir / family)
    golden = read_golden(family_tokenizers_dir / "_golden", GOLDEN[family])
    assert len(golden) > 40
    wrong = [(text, want, got) for text, want in golden if (got := tok.encode(text, add_special_tokens=False)) != want]
    assert not wrong, f"{len(wrong)}/{len(golden)} golden strings differ, first: {wrong[0]!r}"


@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_ids(family_tokenizers_dir, family):
    tok = load(family_tokenizers_dir / family)
    expected = SPECIAL_IDS[family]
    assert {token: tok.convert_tokens_to_ids(token) for token in expected} == expected
    # ...and each is one token in text too, not split into ordinary pieces.
    assert {token: tok.encode(token, add_special_tokens=False) for token in expected} == {
        token: [i] for token, i in expected.items()
    }
    assert tok.chat_template


def test_qwen25_lacks_qwen3_tokens(family_tokenizers_dir):
    """Qwen3's <think> (151667) is not a token of Qwen2.5: there it is plain text."""
    tok = load(family_tokenizers_dir / "qwen2.5-instruct")
    assert len(tok) == 151665
    assert tok.encode("<think>", add_special_tokens=False) == [13708, 766, 29]


def test_mistral_merges_follow_sentencepiece_scores(family_tokenizers_dir):
    """Runs of spaces: the ids SentencePiece itself gives (▁▁▁ + ▁return, not ▁▁▁▁ + return)."""
    tok = load(family_tokenizers_dir / "mistral-7b-instruct-v0.3")
    assert tok.encode("def f():\n    return 1") == [1, 1569, 1053, 6656, 781, 3055, 1372, 29473, 29508]
    assert tok.encode("a  b   c", add_special_tokens=False) == [1032, 29473, 1055, 1027, 1045]


# The reasoning, tool-use and per-turn end-of-turn templates' tokenizers (tokenizer + template only).
TEMPLATE_SPECIAL_IDS = {
    "deepseek-v3": {"<｜begin▁of▁sentence｜>": 0, "<｜end▁of▁sentence｜>": 1, "<｜User｜>": 128803, "<｜Assistant｜>": 128804,
                    "<｜tool▁calls▁begin｜>": 128806},
    "deepseek-r1": {"<｜begin▁of▁sentence｜>": 0, "<｜end▁of▁sentence｜>": 1, "<｜User｜>": 128803, "<｜Assistant｜>": 128804},
    "qwq-32b": {"<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667, "</think>": 151668},
    "gpt-oss": {"<|return|>": 200002, "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007,
                "<|message|>": 200008, "<|call|>": 200012},
}


@pytest.mark.parametrize("family", fetch_tokenizers.TEMPLATE_FAMILIES)
def test_template_families_special_token_ids(family_tokenizers_dir, family):
    if not fetch_tokenizers.fetched(family_tokenizers_dir):
        pytest.fail("the tokenizer cache predates these families: run `make tokenizers`", pytrace=False)
    tok = load(family_tokenizers_dir / family)
    expected = TEMPLATE_SPECIAL_IDS[family]
    assert {token: tok.encode(token, add_special_tokens=False) for token in expected} == {
        token: [i] for token, i in expected.items()
    }
    assert tok.chat_template


def test_deepseek_loads_its_tokenizer_json_as_it_is(family_tokenizers_dir):
    """Named `LlamaTokenizer`, transformers>=5 would rebuild DeepSeek's byte-level BPE as a Metaspace
    tokenizer: "Is 7 prime?" is [4910, 223, 25, 4309, 33] in its tokenizer.json, not [4910, 25, 9344, 33]."""
    from tokenizers import Tokenizer

    folder = family_tokenizers_dir / "deepseek-v3"
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert raw.encode("Is 7 prime?", add_special_tokens=False).ids == [4910, 223, 25, 4309, 33]
    assert load(folder).encode("Is 7 prime?", add_special_tokens=False) == [4910, 223, 25, 4309, 33]


def test_a_tokenizer_loaded_unlike_its_tokenizer_json_is_refused(family_tokenizers_dir, tmp_path):
    """curate refuses to score with ids that are not the model's, and says how to load it as it is."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from curate.tokenize import ChatTokenizer

    folder = tmp_path / "deepseek-as-llama"
    shutil.copytree(family_tokenizers_dir / "deepseek-v3", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(ValueError, match="PreTrainedTokenizerFast"):
        ChatTokenizer(AutoTokenizer.from_pretrained(folder))
