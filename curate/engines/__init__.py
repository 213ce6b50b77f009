"""Engines: one object per backend that scores and generates (the protocol is in base.py).

`make_engine` lives here, above the backends, so base.py never imports them."""

from __future__ import annotations

from curate.engines.base import Engine, EngineSettings


def default_backend() -> str:
    """vllm where it imports, else hf."""
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def make_engine(backend: str, model_dir, settings: EngineSettings = EngineSettings()) -> Engine:
    """The engine of `backend` (vllm, hf, or auto) for the model in `model_dir`."""
    if backend == "auto":
        backend = default_backend()
    if backend == "hf":
        from curate.engines.hf import HFEngine

        return HFEngine(model_dir, settings)
    if backend == "vllm":
        from curate.engines.vllm import VLLMEngine

        return VLLMEngine(model_dir, settings)
    raise ValueError(f"unknown backend {backend!r} (expected vllm, hf or auto)")
