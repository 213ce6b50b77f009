"""`curate eval` and `curate forgetting`: benchmark scores on real benchmark rows, and the
study's TI/BWT, checked against recomputations from the per-example results."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_curate
from curate.evaluate import RESULTS, evaluate, forgetting, task_file

LIMIT = 4


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, model_dir, vllm_engine, chat_tokenizer):

    out = tmp_path_factory.mktemp("eval")
    tasks = {name: task_file(name) for name in ("gsm8k", "mbpp", "arc_easy")}
    summary = evaluate(model_dir, tasks, out, vllm_engine, chat_tokenizer,
                       limit=LIMIT, max_new_tokens=128)
    return out, summary


@pytest.mark.slow
def test_every_task_scores_its_first_rows_with_an_interval(evaluated):
    out, summary = evaluated
    saved = json.loads((out / RESULTS).read_text())
    assert set(saved["tasks"]) == {"gsm8k", "mbpp", "arc_easy"}
    for name, result in summary.tasks.items():
        rows = pq.read_table(out / f"{name}.parquet").to_pylist()
        assert len(rows) == LIMIT
        decided = [float(r["correct"]) for r in rows if r["correct"] is not None]
        assert result.examples == len(decided) and result.score == pytest.approx(np.mean(decided))
        low, high = result.interval
        assert low <= result.score <= high
        assert all(r["gold_nll"] > 0 for r in rows) and result.gold_nll > 0
    # The code task's answers went through the sandboxed checker.
    reasons = [r["reason"] for r in pq.read_table(out / "mbpp.parquet").to_pylist()]
    assert all(r == "all tests passed" or r.startswith(("tests failed", "timed out", "exited")) for r in reasons)


@pytest.mark.slow
def test_multiple_choice_log_likelihoods_match_a_direct_computation(evaluated, model_dir, tokenizer):
    """Each option's log-likelihood, recomputed with plain transformers from the chat template."""
    from transformers import AutoModelForCausalLM

    out, _ = evaluated
    result = pq.read_table(out / "arc_easy.parquet").to_pylist()[0]
    row = json.loads(task_file("arc_easy").read_text().splitlines()[0])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    prompt = [{"role": "user", "content": row["prompt"]}]
    start = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))
    for choice, stored in zip(row["choices"], result["loglik"]):
        text = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": choice.strip()}], tokenize=False)
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([encoding["input_ids"]])
        end = text.index("<|im_end|>", start)
        answer = [i for i, (a, b) in enumerate(encoding["offset_mapping"]) if b > start and a < end]
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(ids).logits[0], dim=-1)
        expected = sum(float(logprobs[i - 1, ids[0, i]]) for i in answer)
        assert stored == pytest.approx(expected, abs=2e-2)
    assert result["predicted"] == int(np.argmax(result["loglik"]))


def _results(directory, correct: dict[str, list[int]]):
    """A `curate eval` result directory holding the given per-example outcomes."""
    directory.mkdir()
    tasks = {}
    for task, values in correct.items():
        pq.write_table(pa.table({"id": [f"{task}-{i}" for i in range(len(values))], "correct": [bool(v) for v in values]}),
                       directory / f"{task}.parquet")
        tasks[task] = {"score": float(np.mean(values))}
    (directory / RESULTS).write_text(json.dumps({"model": "x", "tasks": tasks}))
    return directory


def test_ti_and_bwt_are_the_studys_relative_changes(tmp_path):
    base = _results(tmp_path / "base", {"mbpp": [1, 0, 0, 1, 0, 0, 0, 0], "gsm8k": [1, 1, 0, 0], "arc": [1, 1, 1, 0, 1, 0]})
    tuned = _results(tmp_path / "tuned", {"mbpp": [1, 1, 0, 1, 1, 0, 0, 0], "gsm8k": [1, 0, 0, 0], "arc": [1, 1, 1, 0, 1, 1]})
    result = forgetting(base, tuned, "mbpp")
    assert result.ti == pytest.approx((4 / 8 - 2 / 8) / (2 / 8))  # +100%
    assert result.bwt == pytest.approx(((1 / 4 - 2 / 4) / (2 / 4) + (5 / 6 - 4 / 6) / (4 / 6)) / 2)
    assert result.absolute["gsm8k"][0] == pytest.approx(-0.25)
    assert result.ti_interval[0] <= result.ti <= result.ti_interval[1]
    shown = run_curate("forgetting", base, tuned, "--target", "mbpp", "--json").stdout
    assert json.loads(shown)["ti"] == pytest.approx(1.0)


def test_forgetting_refuses_evaluations_of_different_examples(tmp_path):
    base = _results(tmp_path / "base", {"mbpp": [1, 0], "arc": [1, 0]})
    tuned = _results(tmp_path / "tuned", {"mbpp": [1, 0, 1], "arc": [1, 0]})
    with pytest.raises(ValueError, match="different examples"):
        forgetting(base, tuned, "mbpp")


# ---------------------------------------------------------------- the shared prompt of multiple-choice options


def _option_groups(task: str, rows: int, chat_tokenizer) -> list[list[list[int]]]:
    groups = []
    for index, line in zip(range(rows), task_file(task).read_text().splitlines()):
        row = json.loads(line)
        prompt = {"role": "user", "content": row["prompt"]}
        groups.append([chat_tokenizer.encode(index, [prompt, {"role": "assistant", "content": c.strip()}]).input_ids
                       for c in row["choices"]] + [chat_tokenizer.encode(index, row["messages"]).input_ids])
    return groups


def test_options_sharing_their_prompt_score_as_each_option_alone(hf_engine, chat_tokenizer):
    """`score_groups` runs each row's prompt once (its keys and values reused by every option);
    the log-probabilities are those of scoring every option whole, on real rows of three tasks."""
    groups = [group for task in ("arc_easy", "piqa", "hellaswag") for group in _option_groups(task, 3, chat_tokenizer)]
    groups.append([[1, 2, 3]])  # a group of one, and one with nothing shared, are scored whole
    groups.append([[5, 6, 7], [8, 9]])
    shared = hf_engine.score_groups(groups)
    whole = hf_engine.score([sequence for group in groups for sequence in group])
    flat = [logprobs for group in shared for logprobs in group]
    assert [len(a) for a in flat] == [len(s) for group in groups for s in group]
    for a, b in zip(flat, whole):
        assert np.isnan(a[0]) and np.isnan(b[0])
        np.testing.assert_allclose(a[1:], b[1:], atol=1e-4, rtol=0)


def test_multiple_choice_gold_nll_from_the_shared_pass_is_the_gold_answers_nll(tmp_path, model_dir, hf_engine,
                                                                                chat_tokenizer):
    out = evaluate(model_dir, {"arc_easy": task_file("arc_easy")}, tmp_path, hf_engine, chat_tokenizer, limit=5)
    rows = pq.read_table(tmp_path / "arc_easy.parquet").to_pylist()
    direct = {}  # each gold answer scored alone: the mean NLL of its target tokens
    for index, line in zip(range(5), task_file("arc_easy").read_text().splitlines()):
        row = json.loads(line)
        encoded = chat_tokenizer.encode(index, row["messages"])
        logprobs = hf_engine.score([encoded.input_ids])[0]
        direct[row["id"]] = float(-np.mean([lp for lp, t in zip(logprobs, encoded.target) if t]))
    assert [r["gold_nll"] for r in rows] == pytest.approx([direct[r["id"]] for r in rows], abs=1e-4)
    assert out.tasks["arc_easy"].gold_nll == pytest.approx(np.mean(list(direct.values())), abs=1e-4)
    only = evaluate(model_dir, {"arc_easy": task_file("arc_easy")}, tmp_path / "nll", hf_engine, chat_tokenizer,
                    limit=5, gold_nll_only=True)
    assert only.tasks["arc_easy"].gold_nll == pytest.approx(out.tasks["arc_easy"].gold_nll, abs=1e-4)


def test_an_evaluation_resumes_and_loses_no_row(tmp_path, model_dir, hf_engine, chat_tokenizer):
    """A row the evaluation cannot use is a reject with its reason, not a silent gap; a rerun resumes
    (nothing rescored), and a rerun with another tokenizer setting is refused, not mixed in."""
    from curate.store import StoreError, read_manifest

    rows = [json.loads(line) for line in task_file("arc_easy").read_text().splitlines()[:6]]
    rows[2]["gold"] = 9  # an index past the choices
    del rows[4]["choices"]
    source = tmp_path / "arc.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "eval"
    first = evaluate(model_dir, {"arc_easy": source}, out, hf_engine, chat_tokenizer)
    scored = pq.read_table(out / "arc_easy.parquet").column("id").to_pylist()
    rejects = [json.loads(line) for line in (out / "arc_easy.choices" / "rejects.jsonl").read_text().splitlines()]
    assert scored == [rows[i]["id"] for i in (0, 1, 3, 5)] and [r["row"] for r in rejects] == [2, 4]
    assert "`gold`" in rejects[0]["reason"] and "`choices`" in rejects[1]["reason"]
    assert first.tasks["arc_easy"].rejected == 2 and first.tasks["arc_easy"].examples == 4

    shard = out / "arc_easy.choices" / read_manifest(out / "arc_easy.choices").shards[0]["file"]
    written = shard.stat().st_mtime_ns
    again = evaluate(model_dir, {"arc_easy": source}, out, hf_engine, chat_tokenizer)
    assert shard.stat().st_mtime_ns == written and again.tasks["arc_easy"].score == first.tasks["arc_easy"].score

    from curate.tokenize import ChatTokenizer

    other = ChatTokenizer(chat_tokenizer.tokenizer, max_length=chat_tokenizer.max_length, system_prompt="drop")
    with pytest.raises(StoreError, match="system_prompt"):
        evaluate(model_dir, {"arc_easy": source}, out, hf_engine, other)


def test_a_killed_evaluation_finishes_with_each_row_once_and_nothing_rescored(tmp_path, model_dir, hf_engine,
                                                                              chat_tokenizer):
    """`kill -9` of `curate eval` after its first committed shard; the rerun keeps that shard as it was,
    scores the rest, and ends with the results of an evaluation that was never stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from curate.store import read_manifest

    source = tmp_path / "arc.jsonl"
    source.write_text("".join(task_file("arc_easy").read_text().splitlines(keepends=True)[:8]))
    out = tmp_path / "eval"
    args = ["eval", str(model_dir), "--tasks", f"arc_easy={source}", "-o", str(out), "--backend", "hf", "--shard-rows", "2"]
    journal = out / "arc_easy.choices" / "shards.jsonl"
    killed = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "curate"), *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while killed.poll() is None and time.monotonic() < deadline and not (journal.exists() and journal.read_text().strip()):
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the evaluation finished before it could be killed"
    before = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    assert 1 <= len(before) < 4
    written = {shard["file"]: (out / "arc_easy.choices" / shard["file"]).stat().st_mtime_ns for shard in before}

    run_curate(*args)
    shards = read_manifest(out / "arc_easy.choices").shards
    assert sorted(tuple(s["rows"]) for s in shards) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    kept = {s["file"]: s for s in shards}
    for shard in before:  # committed before the kill: kept as written, not scored again
        assert kept[shard["file"]]["sha256"] == shard["sha256"]
        assert (out / "arc_easy.choices" / shard["file"]).stat().st_mtime_ns == written[shard["file"]]

    whole = evaluate(model_dir, {"arc_easy": source}, tmp_path / "whole", hf_engine, chat_tokenizer)
    resumed, reference = pq.read_table(out / "arc_easy.parquet"), pq.read_table(tmp_path / "whole" / "arc_easy.parquet")
    expected = [json.loads(line)["id"] for line in source.read_text().splitlines()]
    assert resumed.column("id").to_pylist() == reference.column("id").to_pylist() == expected
    assert resumed.column("correct").to_pylist() == reference.column("correct").to_pylist()
    np.testing.assert_allclose(resumed.column("gold_nll").to_numpy(), reference.column("gold_nll").to_numpy(), rtol=1e-4)
    assert json.loads((out / RESULTS).read_text())["tasks"]["arc_easy"]["score"] == whole.tasks["arc_easy"].score
