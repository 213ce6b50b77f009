"""Scoring with plain transformers: no vLLM needed, and the reference the vLLM path is tested against."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}[dtype]


def attention_implementation(model_dir) -> str | None:
    """`eager` for models with attention-logit soft-capping (Gemma-2): PyTorch's `sdpa`
    kernel has no soft-cap, and transformers would run it anyway, giving log-probabilities
    off by up to 0.2 nats on a tiny Gemma-2 (tests/test_families.py). None: the default."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    config = getattr(config, "text_config", None) or config
    return "eager" if getattr(config, "attn_logit_softcapping", None) else None


def load_causal_lm(model_dir, dtype: str = "auto", device: str | None = None):
    """(model, device, dtype name): the model in eval mode on `device` (CUDA when present)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # our own progress bar and summary say enough
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    implementation = attention_implementation(model_dir)
    options = {"attn_implementation": implementation} if implementation else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, **options).to(device).eval()
    return model, device, str(torch_dtype).removeprefix("torch.")


class HFScorer:
    """Batches sequences by a token budget (longest first, little padding) and computes
    log-softmax over the vocabulary a few positions at a time, so a 256k vocabulary never
    needs the full [tokens x vocab] float32 logits in memory.

    token_budget: padded tokens per forward pass. logits_budget: logit elements per chunk
    (2**26 float32 = 256 MiB).
    """

    backend = "hf"

    def __init__(self, model_dir, dtype: str = "auto", device: str | None = None,
                 token_budget: int = 8192, logits_budget: int = 2**26):
        self.model, self.device, self.dtype = load_causal_lm(model_dir, dtype, device)
        self.body = getattr(self.model, self.model.base_model_prefix)
        self.head = self.model.get_output_embeddings()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)  # Gemma-2
        self.token_budget = token_budget
        self.logits_budget = logits_budget

    def score(self, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(token_ids)
        for batch in self._batches(token_ids):
            for index, logprobs in zip(batch, self._score_batch([token_ids[i] for i in batch])):
                results[index] = logprobs
        return results  # type: ignore[return-value]

    def close(self) -> None:
        del self.model, self.body, self.head

    def _batches(self, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        batches, current = [], []
        for index in order:
            longest = len(token_ids[current[0]]) if current else len(token_ids[index])
            if current and longest * (len(current) + 1) > self.token_budget:
                batches.append(current)
                current = []
            current.append(index)
        return batches + ([current] if current else [])

    @torch.inference_mode()
    def _score_batch(self, sequences: list[Sequence[int]]) -> list[np.ndarray]:
        width = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.as_tensor(sequence)
            mask[row, : len(sequence)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.body(input_ids=ids, attention_mask=mask).last_hidden_state
        # Position t predicts token t+1; keep only real (unpadded) predictions.
        predicts = mask[:, 1:].bool()
        states = hidden[:, :-1][predicts]
        targets = ids[:, 1:][predicts]
        flat = self._token_logprobs(states, targets).cpu().numpy()
        out, cursor = [], 0
        for sequence in sequences:
            logprobs = np.full(len(sequence), np.nan, dtype=np.float32)
            logprobs[1:] = flat[cursor : cursor + len(sequence) - 1]
            cursor += len(sequence) - 1
            out.append(logprobs)
        return out

    def _token_logprobs(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """ln softmax(head(states))[targets], a chunk of positions at a time, in float32 or better."""
        vocab = self.head.weight.shape[0]
        chunk = max(1, self.logits_budget // vocab)
        pieces = []
        for start in range(0, states.shape[0], chunk):
            logits = self.head(states[start : start + chunk])
            if logits.dtype in (torch.bfloat16, torch.float16):
                logits = logits.float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            chosen = logits.gather(1, targets[start : start + chunk, None])[:, 0]
            pieces.append(chosen - torch.logsumexp(logits, dim=-1))
        return torch.cat(pieces) if pieces else torch.empty(0)
