"""Self-output as the study does it: the chosen answer per prompt is its lowest-perplexity
finished, verified one; only the generated turn is trained; and no command loses data."""

import json
import math
import shutil

import polars as pl
import pyarrow.parquet as pq
import pytest

from conftest import run_curate
from curate.engines.base import SamplingOptions
from curate.export import ExportOptions, dropped_path, export
from curate.generate import generate_dataset
from curate.pipeline import RunOptions
from curate.score import score_dataset
from curate.store import StoreError, read_manifest


def _rows(sample_path, kind: str, n: int) -> list[dict]:
    return [r for r in map(json.loads, sample_path.read_text().splitlines()) if r["id"].startswith(kind)][:n]


PROMPTS = 7


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, sample_path, model_dir, vllm_engine, chat_tokenizer):
    """n=4 sampled answers (seeded) to math, code and open prompts, two of which share an id,
    plus a multi-turn prompt; generated and scored with the session's vLLM engine."""
    root = tmp_path_factory.mktemp("sampled")
    math_rows, code_rows = _rows(sample_path, "math-", 2), _rows(sample_path, "code-", 3)
    rows = [*math_rows, *code_rows, *_rows(sample_path, "general-", 1)]
    rows[4] = rows[4] | {"id": rows[3]["id"]}  # a duplicate id: still two prompts
    first = math_rows[0]["messages"]
    rows.append({"id": "multi", "reference": math_rows[1]["reference"],
                 "messages": [*first, *math_rows[1]["messages"]]})
    assert len(rows) == PROMPTS
    source = root / "input.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    generated, scored = root / "gen", root / "gen-scored"
    generate_dataset(source, generated, vllm_engine, chat_tokenizer,
                     SamplingOptions(n=4, temperature=0.7, top_p=0.95, max_new_tokens=128, seed=1), checker="auto")
    score_dataset(generated, scored, vllm_engine, chat_tokenizer, model_name="default", model_dir=model_dir)
    ground_truth = root / "gt-scored"
    score_dataset(source, ground_truth, vllm_engine, chat_tokenizer, model_name="default", model_dir=model_dir)
    return source, generated, scored, ground_truth


def _expected_choice(scored_dir) -> dict[int, list[int]]:
    """Recomputed from the scored Parquet: per source row, the input_ids of its finished,
    verified (or unchecked) answer of lowest exp(mean NLL of the target tokens)."""
    frame = pl.read_parquet(sorted(scored_dir.glob("part-*.parquet"))).to_dicts()
    best: dict[int, tuple[float, list[int]]] = {}
    for row in frame:
        extra = json.loads(row["extra"])
        if not extra["finished"] or extra["verified"] is False:
            continue
        nll = [-lp for lp, t in zip(row["logprobs"], row["target"]) if t]
        ppl = math.exp(sum(nll) / len(nll))
        if extra["row"] not in best or ppl < best[extra["row"]][0]:
            best[extra["row"]] = (ppl, row["input_ids"])
    return {source: ids for source, (_, ids) in best.items()}


@pytest.mark.slow
def test_the_chosen_answer_is_the_lowest_perplexity_finished_verified_one(tmp_path, sampled, tokenizer):
    source, generated, scored, ground_truth = sampled
    answers = pl.read_parquet(sorted(generated.glob("part-*.parquet")))
    assert answers.height == PROMPTS * 4 and answers["finished"].sum() < answers.height, "some answers must be cut off"
    expected = _expected_choice(scored)
    assert 0 < len(expected) < PROMPTS, "the seeded samples must leave some prompts without a usable answer"

    stats = export(scored, tmp_path / "self.parquet", ExportOptions(mode="self-output"), tokenizer)
    trained = pq.read_table(tmp_path / "self.parquet").to_pylist()
    assert sorted(map(tuple, (r["input_ids"] for r in trained))) == sorted(map(tuple, expected.values()))
    assert stats.self_output_prompts == len(expected) and stats.prompts_dropped == PROMPTS - len(expected)

    # With the ground-truth fallback every prompt is trained once, matched by row, not by id.
    options = ExportOptions(mode="self-output", on_wrong="ground-truth", ground_truth=ground_truth)
    stats = export(scored, tmp_path / "mixed.parquet", options, tokenizer)
    mixed = pq.read_table(tmp_path / "mixed.parquet").to_pylist()
    assert len(mixed) == PROMPTS and stats.ground_truth_fallbacks == PROMPTS - len(expected) and stats.prompts_dropped == 0
    reasons = [json.loads(line)["reason"] for line in dropped_path(tmp_path / "mixed.parquet").read_text().splitlines()]
    assert len(reasons) == PROMPTS * 4 - len(expected)
    assert all(r.startswith(("another answer", "no verified answer", "only answers cut off")) for r in reasons)


@pytest.mark.slow
def test_only_the_generated_turn_of_a_multi_turn_prompt_is_trained(sampled, tokenizer):
    _, _, scored, _ = sampled
    rows = [r for r in pl.read_parquet(sorted(scored.glob("part-*.parquet"))).to_dicts() if r["id"] == "multi"]
    assert len(rows) == 4
    for row in rows:
        earlier, generated = [m for m in row["messages"] if m["role"] == "assistant"]
        assert earlier["weight"] == 0
        trained = tokenizer.decode([i for i, t in zip(row["input_ids"], row["target"]) if t])
        assert trained == generated["content"] + "<|im_end|>" and earlier["content"] not in trained


def test_score_refuses_to_write_over_or_into_its_input(tmp_path, scored_sample):
    copy = tmp_path / "scored"
    shutil.copytree(scored_sample, copy)
    before = sorted((p.name, p.stat().st_size) for p in copy.iterdir())
    for output in (copy, copy / "inner", tmp_path):
        result = run_curate("score", copy, "-o", output, "--overwrite", "--backend", "hf", check=False)
        assert result.returncode != 0 and "overlaps the input" in result.stderr, output
    assert sorted((p.name, p.stat().st_size) for p in copy.iterdir()) == before


def test_a_directory_input_is_read_through_its_manifest(tmp_path, scored_sample, hf_engine, chat_tokenizer):
    from curate.data import read_records

    copy = tmp_path / "scored"
    shutil.copytree(scored_sample, copy)
    shutil.copy(copy / "part-00000.parquet", copy / "part-00999.parquet")  # a leftover no manifest records
    assert len(list(read_records(copy))) == 82
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest | {"complete": False}))
    with pytest.raises(StoreError, match="not finished .* --resume"):
        score_dataset(copy, tmp_path / "again", hf_engine, chat_tokenizer, model_name="default")


def test_resume_refuses_any_changed_option_and_names_it(tmp_path, sample_path, hf_engine, chat_tokenizer, model_dir):
    from curate.tokenize import ChatTokenizer

    source = tmp_path / "four.jsonl"
    source.write_text("\n".join(sample_path.read_text().splitlines()[:4]) + "\n")
    score_dataset(source, tmp_path / "run", hf_engine, chat_tokenizer, model_name="default", model_dir=model_dir)
    merged = ChatTokenizer(chat_tokenizer.tokenizer, max_length=4096, system_prompt="merge")
    with pytest.raises(StoreError, match="targets differs"):
        score_dataset(source, tmp_path / "run", hf_engine, merged, model_name="default", model_dir=model_dir, run=RunOptions(resume=True))
    run = read_manifest(tmp_path / "run")
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(run.to_json() | {"meta": run.meta | {"dtype": "bfloat16"}}))
    with pytest.raises(StoreError, match="dtype differs"):
        score_dataset(source, tmp_path / "run", hf_engine, chat_tokenizer, model_name="default", model_dir=model_dir, run=RunOptions(resume=True))
