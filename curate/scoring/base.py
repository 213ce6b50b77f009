"""The one interface both backends implement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Scorer(Protocol):
    """Teacher-forced log-probabilities of token sequences under one model.

    `score(token_ids)` returns, for each sequence, a float32 array as long as the sequence:
    entry i is ln p(token_i | tokens before i), raw (no temperature); entry 0 is NaN
    because the first token has no context.
    """

    backend: str
    dtype: str

    def score(self, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]: ...

    def close(self) -> None: ...


def default_backend() -> str:
    """vllm where it imports, else hf."""
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def make_scorer(backend: str, model_dir, dtype: str = "auto", max_length: int = 4096, **options) -> Scorer:
    if backend == "auto":
        backend = default_backend()
    if backend == "hf":
        from curate.scoring.hf import HFScorer

        return HFScorer(model_dir, dtype=dtype, **options)
    if backend == "vllm":
        from curate.scoring.vllm import VLLMScorer

        return VLLMScorer(model_dir, dtype=dtype, max_model_len=max_length, **options)
    raise ValueError(f"unknown backend {backend!r} (expected vllm, hf or auto)")
