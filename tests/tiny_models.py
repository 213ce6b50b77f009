"""Tiny random-weight causal LMs around real chat tokenizers, one per model family.

The weights mean nothing; the architecture class, the vocabulary and the chat template are
the family's own, which is what scoring, export and training have to get right. Each model
is ~10-70 MB (the embedding of a 32k-262k vocabulary at width 64) and builds in seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# Family folder -> (transformers model_type, settings that differ from the shared tiny shape).
ARCHITECTURES = {
    "llama-3.1-instruct": ("llama", {}),
    "gemma-2-it": ("gemma2", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 64}),
    "gemma-3-it": ("gemma3_text", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 64}),
    "mistral-7b-instruct-v0.3": ("mistral", {"head_dim": 32, "sliding_window": None}),
    "qwen2.5-instruct": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "phi-3.5-mini-instruct": ("phi3", {}),
}

_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True)


def build_tiny_model(tokenizer_dir: Path, family: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a loadable model directory (config, safetensors, tokenizer) into `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_type, settings = ARCHITECTURES[family]
    vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    config = AutoConfig.for_model(model_type, **_SHAPE, **settings, vocab_size=vocab_size,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so log-probabilities vary by token
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.5)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out_dir)
    return out_dir
