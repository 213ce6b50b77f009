"""The HF engine's scoring on a GPU, against a bare forward pass and the GPU's bf16 peak.

    python bench/gpu_score.py              # on a CUDA machine: Llama-3-8B and Gemma-2-2B shapes, bf16
    python bench/gpu_score.py --tiny       # anywhere: tiny shapes, to check the script runs

Needs only torch, transformers and numpy (no vLLM, no network, no weights): each model is built
with random weights directly on the device, since speed needs no trained weights. For each
model and row length (short rows of 256 tokens, long rows of 4096) it prints the HF engine's
tokens/s, the bare forward pass's (the body and the head's logits for every position, nothing
extracted) and their ratio, the model FLOPs utilisation (2 x parameters + attention, per token,
against the bf16 peak of the GPU) and the memory peak. Mixed lengths are scored too: the
engine batches longest first, so padding stays small. Fits a 10-minute call on one H100/H200.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.engines.base import EngineSettings  # noqa: E402
from curate.engines.hf import HFEngine, right_padded  # noqa: E402

# Dense bf16 tensor-core peak, FLOP/s.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}

SHAPES = {
    "llama-3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                                 rope_theta=500000.0, tie_word_embeddings=False)),
    "gemma-2-2b": ("gemma2", dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                                  num_key_value_heads=4, head_dim=256, vocab_size=256000, max_position_embeddings=8192,
                                  final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=256,
                                  sliding_window=4096)),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=4096, max_position_embeddings=8192)


def build(name: str, device: str, dtype: torch.dtype, tiny: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, shape = SHAPES[name]
    shape = {**shape, **TINY, "head_dim": 32} if tiny else shape
    config = AutoConfig.for_model(model_type, **shape)
    if model_type == "gemma2":
        config._attn_implementation = "eager"  # soft-capping: as the engine loads Gemma-2
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(dtype).eval()  # older transformers take `torch_dtype`, not `dtype`: be sure


def flops_per_token(model, length: int) -> float:
    """2 x parameters (the matmuls) + the attention scores and values over the context (causal: half)."""
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 2 * 2 * config.num_hidden_layers * config.num_attention_heads * head_dim * (length / 2)
    return 2 * parameters + attention


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int) -> float:
    fn()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def measure(engine, model, rows: list[list[int]], device: str, repeat: int) -> tuple[float, float]:
    """Seconds per pass of the engine's scoring, and of a bare forward pass (every position's
    logits, nothing extracted) over the same batches."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(lambda: engine.score(rows), device, repeat)

    def forward():
        with torch.inference_mode():
            for batch in engine._batches(rows):
                ids, mask = right_padded([rows[i] for i in batch], device)
                model(input_ids=ids, attention_mask=mask, logits_to_keep=0)

    return seconds, timed(forward, device, repeat)


def mask_cost(engine, model, rows: list[list[int]], device: str, repeat: int) -> tuple[float, float, int]:
    """Why mixed lengths are slower: the bare forward pass over the same padded batches with their
    attention mask and without one (the padding then attended: wrong values, the causal-only
    kernel), and the padded token count."""
    batches = [right_padded([rows[i] for i in batch], device) for batch in engine._batches(rows)]

    def forward(with_mask: bool):
        with torch.inference_mode():
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask if with_mask else None, logits_to_keep=0)

    padded = sum(ids.numel() for ids, _ in batches)
    return timed(lambda: forward(True), device, repeat), timed(lambda: forward(False), device, repeat), padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check that the script runs)")
    parser.add_argument("--models", default="llama-3-8b,gemma-2-2b")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per measurement")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peak", type=float, default=None, help="bf16 peak FLOP/s [default: by the GPU's name]")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = args.peak or next((value for key, value in PEAKS.items() if key in name), None)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"device {name}, {dtype}, bf16 peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    print(f"{'model':<12} {'rows':<10} {'engine tok/s':>12} {'forward tok/s':>13} {'ratio':>6} {'MFU':>6} {'peak GiB':>8}")
    rng = np.random.default_rng(0)
    for model_name in args.models.split(","):
        model = build(model_name, device, dtype, args.tiny)
        vocab = model.config.vocab_size
        engine = HFEngine.from_model(model, EngineSettings(max_num_batched_tokens=16384 if device == "cuda" else 4096))
        for label, lengths in (("256", [256] * (args.tokens // 256)), ("4096", [4096] * max(1, args.tokens // 4096)),
                               ("mixed", list(rng.integers(64, 4096, size=max(2, args.tokens // 2048))))):
            rows = [rng.integers(0, vocab, size=int(n)).tolist() for n in lengths]
            tokens = sum(map(len, rows))
            seconds, bare = measure(engine, model, rows, device, args.repeat)
            memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            mean_length = tokens / len(rows)
            mfu = tokens * flops_per_token(model, mean_length) / seconds / peak if peak else float("nan")
            print(f"{model_name:<12} {label:<10} {tokens / seconds:>12,.0f} {tokens / bare:>13,.0f} "
                  f"{bare / seconds:>6.2f} {mfu:>6.1%} {memory:>8.1f}", flush=True)
            if label == "mixed":
                masked, unmasked, padded = mask_cost(engine, model, rows, device, args.repeat)
                print(f"{'':<12} {'':<10} padded tokens {padded / tokens:.2f}x real; bare forward of the padded "
                      f"batches with their mask {tokens / masked:,.0f} tok/s, without {tokens / unmasked:,.0f} tok/s "
                      f"({masked / unmasked:.2f}x the time)", flush=True)
        del engine, model
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
