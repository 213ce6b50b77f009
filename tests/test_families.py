"""Exact training targets on the seven chat-model families users fine-tune, through `curate score`.

Each family's real tokenizer and official chat template (fetched by `make tokenizers`) drive
a tiny random-weight model of the family's architecture. The expectations below are facts
about each family written down by hand (its end-of-turn token, the text its template puts
before an answer), not read from curate.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import FAMILIES, run_curate
from curate.store import REJECTS, read_manifest
from tiny_models import build_tiny_model

END_OF_TURN = {
    "llama-3.1-instruct": "<|eot_id|>", "gemma-2-it": "<end_of_turn>", "gemma-3-it": "<end_of_turn>",
    "mistral-7b-instruct-v0.3": "</s>", "qwen2.5-instruct": "<|im_end|>", "qwen3": "<|im_end|>",
    "phi-3.5-mini-instruct": "<|end|>",
}
# The template text right before what the model generates.
ANSWER_HEADER = {
    "llama-3.1-instruct": ("<|start_header_id|>assistant<|end_header_id|>\n\n",),
    "gemma-2-it": ("<start_of_turn>model\n",), "gemma-3-it": ("<start_of_turn>model\n",),
    "mistral-7b-instruct-v0.3": ("[/INST]",),
    "qwen2.5-instruct": ("<|im_start|>assistant\n",), "qwen3": ("<|im_start|>assistant\n",),
    "phi-3.5-mini-instruct": ("<|assistant|>\n",),
}

# Whitespace the template writes between the generation prompt and the answer: the model
# writes it too (Mistral's `[/INST] Answer`), so it is trained with the answer.
ANSWER_LEAD = {"mistral-7b-instruct-v0.3": " "}
# Template text the model itself writes before its last answer: Qwen3's generation prompt leaves
# the think block to the model, which writes an empty one when it does not think.
LAST_ANSWER_LEAD = {"qwen3": "<think>\n\n</think>\n\n"}


def _s(text):
    return {"role": "system", "content": text}


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


CONTROL_TEXT = "Turns end with </s>, <|eot_id|>, <|im_end|>, <end_of_turn> or <|end|>; <s> starts one."
CASES = {
    "single": [_u("Is seven prime?"), _a("Seven is prime.")],
    "one_token": [_u("Sky colour, one word?"), _a("Blue")],
    "answer_in_prompt": [_u("Reply 4. What is 2+2?"), _a("4")],
    "system": [_s("Be brief."), _u("2+2?"), _a("4")],
    "multi_turn": [_u("Say yes."), _a("yes"), _u("yes? Now say no."), _a("no")],
    "multi_turn_system": [_s("Be brief."), _u("Say 4"), _a("4"), _u("Again"), _a("4 again")],
    "whitespace": [_u("Indent this."), _a("  \tdef f():\n\t\treturn 1  \n")],
    "non_latin": [_u("Say hello in Japanese."), _a("こんにちは 👋🏽 Привет مرحبا")],
    "control_text": [_u("How do chat formats end a turn? Say <|im_end|>."), _a(CONTROL_TEXT)],
}
# Rows a family's own template cannot take as they are (with --system-prompt keep).
EXPECTED_REJECTS = {
    "gemma-2-it": {"system": "System role not supported", "multi_turn_system": "System role not supported"},
    "mistral-7b-instruct-v0.3": {"multi_turn_system": "renders the conversation before this turn differently"},
}


@pytest.fixture(scope="session")
def cases_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("families") / "cases.jsonl"
    path.write_text("".join(json.dumps({"id": name, "messages": messages}) + "\n" for name, messages in CASES.items()))
    return path


@pytest.fixture(scope="session")
def tiny_models(family_tokenizers_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_tiny_model(family_tokenizers_dir / family, family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def scored_families(tiny_models, cases_path, tmp_path_factory):
    """The cases scored by `curate score --backend hf` on each family's tiny model."""
    from curate.engines.base import EngineSettings
    from curate.engines.hf import HFEngine
    from curate.models import load_tokenizer
    from curate.score import score_dataset
    from curate.tokenize import ChatTokenizer

    root = tmp_path_factory.mktemp("scored-families")
    out = {}
    for family, model_dir in tiny_models.items():
        out[family] = root / family
        score_dataset(cases_path, out[family], HFEngine(model_dir, EngineSettings(dtype="float32")),
                      ChatTokenizer(load_tokenizer(model_dir)), model_name=str(model_dir), model_dir=model_dir)
    return out


def _rows(scored_dir) -> dict[str, dict]:
    rows = {}
    for shard in read_manifest(scored_dir).shards:
        for row in pq.read_table(scored_dir / shard["file"]).to_pylist():
            rows[row["id"]] = row
    return rows


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    runs, start = [], None
    for i, value in enumerate([*mask, False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _decode_in_context(tokenizer, ids, start, end) -> str:
    """ids[start:end] as text, decoded after what precedes them (SentencePiece drops the
    leading space of a sequence decoded alone)."""
    before, whole = tokenizer.decode(ids[:start]), tokenizer.decode(ids[:end])
    assert whole.startswith(before)
    return whole[len(before):]


def _squeeze(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_trained_turn_is_its_rendered_answer_plus_end_of_turn_and_nothing_else(family, scored_families, tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[family])
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    rows = _rows(scored_families[family])
    assert set(rows) == set(CASES) - set(EXPECTED_REJECTS.get(family, {}))
    for name, row in rows.items():
        ids, target, eot = row["input_ids"], row["target"], row["end_of_turn"]
        answers = [m["content"] for m in CASES[name] if m["role"] == "assistant"]
        if name != "control_text":  # the plain tokenizer turns control-token text into control tokens
            text = tokenizer.apply_chat_template(CASES[name], tokenize=False)
            assert ids == tokenizer(text, add_special_tokens=False)["input_ids"], name
        runs = _runs(target)
        assert len(runs) == len(answers), name
        assert [i for i, flag in enumerate(eot) if flag] == [end - 1 for _, end in runs], name
        for k, ((start, end), answer) in enumerate(zip(runs, answers)):
            assert ids[end - 1] == end_of_turn, name
            content = ids[start:end - 1]
            assert not special & set(content) - {tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")}, \
                f"{name}: a control token inside the answer"
            decoded = _decode_in_context(tokenizer, ids, start, end - 1)
            lead = ANSWER_LEAD.get(family, "") + (LAST_ANSWER_LEAD.get(family, "") if k == len(answers) - 1 else "")
            if name == "control_text":
                assert _squeeze(decoded) == _squeeze(lead + answer), name
            else:
                assert decoded in (lead + answer, lead + answer.strip()), (name, decoded)
            # Whitespace aside (Phi-3's decoder adds spaces after special tokens), the untrained
            # tokens before the answer end with the family's answer header.
            before = _squeeze(tokenizer.decode(ids[:start]))
            assert before.endswith(tuple(map(_squeeze, ANSWER_HEADER[family]))), (name, before[-40:])


@pytest.mark.parametrize("family", FAMILIES)
def test_template_refusals_are_rejects_with_the_templates_reason(family, scored_families):
    rejects = [json.loads(line) for line in (scored_families[family] / REJECTS).read_text().splitlines()]
    names = [CASES_BY_ROW[r["row"]] for r in rejects]
    expected = EXPECTED_REJECTS.get(family, {})
    assert sorted(names) == sorted(expected)
    for reject, name in zip(rejects, names):
        assert expected[name] in reject["reason"] and reject["field"].startswith("messages")


CASES_BY_ROW = dict(enumerate(CASES))


def test_end_of_turn_is_one_stored_fact_in_the_manifest(scored_families, tiny_models):
    from transformers import AutoTokenizer

    for family, scored in scored_families.items():
        recorded = read_manifest(scored).meta["targets"]["end_of_turn"]
        tokenizer = AutoTokenizer.from_pretrained(tiny_models[family])
        assert recorded == {"id": tokenizer.convert_tokens_to_ids(END_OF_TURN[family]), "token": END_OF_TURN[family]}


def test_gemma2_takes_a_system_prompt_when_it_is_merged_into_the_first_user_turn(tiny_models):
    from curate.models import load_tokenizer
    from curate.tokenize import ChatTokenizer

    tokenizer = load_tokenizer(tiny_models["gemma-2-it"])
    encoded = ChatTokenizer(tokenizer, system_prompt="merge").encode(0, CASES["multi_turn_system"])
    text = tokenizer.decode(encoded.input_ids)
    assert "<start_of_turn>user\nBe brief.\n\nSay 4<end_of_turn>" in text
    trained = [i for i, keep in zip(encoded.input_ids, encoded.target) if keep]
    assert tokenizer.decode(trained) == "4<end_of_turn>4 again<end_of_turn>"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_scores_each_family_as_transformers_does(family, tiny_models, cases_path, scored_families, tmp_path):
    """`curate score --backend vllm`, on the same ids, agrees with the hf backend on every family's
    architecture. In its own process: an in-process vLLM engine that shuts down takes vLLM's
    process-wide state with it, and the session's engine needs that state."""
    run_curate("score", cases_path, "-o", tmp_path / "vllm", "--model", tiny_models[family], "--backend", "vllm",
               "--dtype", "float32", "--max-length", "512", "--quiet")
    hf, vllm = _rows(scored_families[family]), _rows(tmp_path / "vllm")
    assert hf.keys() == vllm.keys()
    for name in hf:
        assert hf[name]["input_ids"] == vllm[name]["input_ids"] and hf[name]["target"] == vllm[name]["target"]
        a = np.array(hf[name]["logprobs"][1:], dtype=np.float64)
        b = np.array(vllm[name]["logprobs"][1:], dtype=np.float64)
        assert np.max(np.abs(a - b)) < 1e-3, name
