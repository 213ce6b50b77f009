"""One engine per backend, as vLLM's `LLM` is one object: it scores and it generates.

An engine is built once from a model directory and `EngineSettings` (plain, picklable data, so
a Ray actor can build the same engine elsewhere) and then serves many batches:

- `score(token_ids)`: for each sequence a float32 array as long as the sequence; entry i is
  ln p(token_i | tokens before i), raw (no temperature); entry 0 is NaN (no context).
- `generate(prompts, sampling)`: per prompt, `sampling.n` answers as (token ids without the
  stop token, finished).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from curate.settings import DEFAULT_MAX_LENGTH, setting

# Bytes the prompt-logprob logits of one engine step may take: vLLM materialises a float32
# [scheduled tokens x vocabulary] array and its log-softmax, which its memory profiling does not
# reserve, so the token budget of a step follows from the vocabulary size. 4 GiB: 4,185 tokens
# of Llama-3's 128k vocabulary, 2,097 of Gemma-2's 256k, 10,922 of SmolLM2's 49k.
LOGITS_BUDGET_BYTES = 4 * 2**30


@dataclass(frozen=True)
class EngineSettings:
    """How to run the model. None means the backend's own default.

    max_num_batched_tokens: tokens per engine step; default `default_batched_tokens(vocab)`.
    kv_cache_gib: the KV cache on CPU (vLLM would otherwise claim most of the RAM).
    """

    dtype: str = setting("dtype")
    max_model_len: int = DEFAULT_MAX_LENGTH  # the command's --max-length, lowered to the model's context
    tensor_parallel_size: int = setting("tensor_parallel_size")
    gpu_memory_utilization: float | None = setting("gpu_memory_utilization")
    max_num_seqs: int | None = setting("max_num_seqs")
    max_num_batched_tokens: int | None = setting("max_num_batched_tokens")
    kv_cache_gib: float = 2.0


@dataclass
class SamplingOptions:
    """Greedy by default; the paper's Self-Output used n=32, temperature 0.7, top-p 0.95."""

    n: int = setting("n")
    temperature: float = setting("temperature")
    top_p: float = setting("top_p")
    max_new_tokens: int = setting("max_new_tokens")
    seed: int = setting("seed")


Answers = list[list[tuple[list[int], bool]]]  # per prompt, n x (token ids without the stop token, finished)


class Engine(Protocol):
    backend: str
    dtype: str
    model_name: str

    def score(self, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]: ...

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingOptions) -> Answers: ...

    def close(self) -> None: ...


def default_batched_tokens(vocab_size: int) -> int:
    """Tokens per engine step such that the prompt-logprob logits stay within LOGITS_BUDGET_BYTES
    (float32 logits plus their log-softmax), between 512 and 16384."""
    fits = LOGITS_BUDGET_BYTES // (vocab_size * 4 * 2)
    return int(max(512, min(16384, fits)))


def stop_ids(tokenizer, generation_config) -> list[int]:
    """End-of-sequence ids: the generation config's (end-of-turn included) and the tokenizer's."""
    ids = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))
