"""Both backends give the log-probabilities of a direct float64 computation, and each other's."""

import json

import numpy as np
import pytest
import torch

from curate.data import normalise


@pytest.fixture(scope="module")
def sample_ids(sample_path, chat_tokenizer):
    lines = sample_path.read_text().splitlines()[:24]
    return [chat_tokenizer.encode(row, normalise(row, json.loads(line)).messages).input_ids for row, line in enumerate(lines)]


@pytest.fixture(scope="module")
def float64_reference(model_dir, sample_ids):
    """log_softmax over full float64 logits, one sequence at a time: no batching, no chunking."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = []
    with torch.inference_mode():
        for ids in sample_ids:
            x = torch.tensor([ids])
            logprobs = torch.log_softmax(model(x).logits[0, :-1], dim=-1).gather(1, x[0, 1:, None])[:, 0]
            out.append(np.concatenate([[np.nan], logprobs.numpy()]))
    return out


def _max_abs_difference(a, b) -> float:
    for x, y in zip(a, b):
        assert len(x) == len(y) and np.isnan(x[0]) and np.isnan(y[0])
    return max(float(np.max(np.abs(x[1:] - y[1:]))) for x, y in zip(a, b))


def test_hf_backend_matches_a_float64_reference(hf_engine, sample_ids, float64_reference):
    assert _max_abs_difference(hf_engine.score(sample_ids), float64_reference) < 1e-3


@pytest.mark.slow
def test_vllm_backend_matches_a_float64_reference(vllm_engine, sample_ids, float64_reference):
    assert _max_abs_difference(vllm_engine.score(sample_ids), float64_reference) < 1e-3


@pytest.mark.slow
def test_vllm_and_hf_backends_agree(vllm_engine, hf_engine, sample_ids):
    assert _max_abs_difference(vllm_engine.score(sample_ids), hf_engine.score(sample_ids)) < 1e-3


def test_hf_results_do_not_depend_on_batching_or_vocabulary_chunking(model_dir, hf_engine, sample_ids):
    from curate.engines.base import EngineSettings
    from curate.engines.hf import HFEngine

    tiny = HFEngine(model_dir, EngineSettings(dtype="float32", max_num_batched_tokens=64), logits_budget=49152 * 3)  # 1 sequence, 3 positions a chunk
    assert _max_abs_difference(tiny.score(sample_ids[:6]), hf_engine.score(sample_ids[:6])) < 1e-4


def test_scores_come_back_in_input_order_whatever_the_lengths(hf_engine, sample_ids):
    shuffled = [sample_ids[i] for i in (5, 0, 17, 3)]
    separately = [hf_engine.score([ids])[0] for ids in shuffled]
    assert _max_abs_difference(hf_engine.score(shuffled), separately) < 1e-4
