"""The GPU recipes, as shipped, train on CPU stand-ins of their models through the real Axolotl.

Each GPU recipe's model is stood in for by a tiny random-weight model of the same architecture
class with the family's real tokenizer and chat template (tests/tiny_models.py). curate scores
a few sample rows with it and exports them; the recipe, filled in by `curate check-recipe`'s
code, then trains two steps on them. CPU_OVERRIDES is everything that differs from the shipped
file: what a CPU cannot do, and the length of the run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
import yaml

from conftest import ROOT, run_curate
from curate.export import ExportOptions, export
from curate.recipes import prepare_recipe, usage_after_training
from test_finetune import _axolotl
from tiny_models import build_tiny_model

RECIPES = ROOT / "recipes" / "axolotl"

# GPU recipe -> (the family whose tokenizer and architecture stand in, the --system-prompt its template needs).
STAND_INS = {
    "gemma-2-2b-it": ("gemma-2-it", "merge"),
    "mistral-7b-instruct-v0.3": ("mistral-7b-instruct-v0.3", "keep"),
    "llama-3-8b-instruct": ("llama-3.1-instruct", "keep"),
}

# Everything the stand-in runs change in a shipped recipe. Its attention (sdpa; Gemma-2: eager),
# bitsandbytes' 8-bit AdamW, gradient checkpointing, the evaluation split and the checkpoints
# all run on CPU as shipped.
CPU_OVERRIDES = {
    "bf16": False,  # bf16 mixed precision needs a GPU ("Your setup doesn't support bf16/gpu"): float32
    "tf32": False,  # a CUDA matmul mode ("--tf32 requires Ampere or a newer GPU arch")
    # Axolotl switches its Triton LoRA kernels on for any LoRA run not told otherwise; they need CUDA.
    "lora_mlp_kernel": False,
    "lora_qkv_kernel": False,
    "lora_o_kernel": False,
    "lora_embedding_kernel": False,
    "max_steps": 2,
    "logging_steps": 1,  # both steps' losses in trainer_state.json
}

LINEAR_LAYERS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@dataclass
class StandInRun:
    rows: Path  # the first 8 sample rows
    model_dir: Path
    data: Path  # curate's STM export
    config: Path  # the shipped recipe filled in, with CPU_OVERRIDES
    output_dir: Path


@pytest.fixture(scope="module")
def stand_in_runs(tmp_path_factory, family_tokenizers_dir, sample_path):
    """recipe -> its StandInRun, trained on first use and kept for the module."""
    from curate.engines.base import EngineSettings
    from curate.engines.hf import HFEngine
    from curate.models import load_tokenizer
    from curate.score import score_dataset
    from curate.tokenize import ChatTokenizer

    rows = tmp_path_factory.mktemp("standin") / "sample-8.jsonl"
    rows.write_text("".join(sample_path.read_text().splitlines(keepends=True)[:8]))
    runs: dict[str, StandInRun] = {}

    def run(recipe: str) -> StandInRun:
        if recipe in runs:
            return runs[recipe]
        family, system_prompt = STAND_INS[recipe]
        root = tmp_path_factory.mktemp(recipe)
        model_dir = build_tiny_model(family_tokenizers_dir / family, family, root / "model")
        tokenizer = load_tokenizer(model_dir)
        score_dataset(
            rows,
            root / "scored",
            HFEngine(model_dir, EngineSettings(dtype="float32")),
            ChatTokenizer(tokenizer, max_length=4096, system_prompt=system_prompt),
            model_name=str(model_dir),
            model_dir=model_dir,
        )
        # A random model finds every token surprising: mask a share (the paper's best, ~25%) instead of τ.
        data = root / "train-stm.parquet"
        export(root / "scored", data, ExportOptions(mode="stm", mask_ratio=0.25, max_length=4096), tokenizer)
        output_dir = root / "run"
        shipped = prepare_recipe(
            RECIPES / f"{recipe}.yml",
            data,
            {"BASE_MODEL": str(model_dir), "OUTPUT_DIR": str(output_dir)},
            root / "shipped.yml",
        )
        settings = yaml.safe_load(shipped.read_text())
        config = root / "cpu.yml"
        config.write_text(yaml.safe_dump({**settings, **CPU_OVERRIDES}, sort_keys=False))
        _axolotl("axolotl", "train", config, cwd=root)
        runs[recipe] = StandInRun(rows, model_dir, data, config, output_dir)
        return runs[recipe]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("recipe", STAND_INS)
def test_gpu_recipe_trains_two_steps_on_a_cpu_stand_in_on_exactly_the_exported_labels(recipe, stand_in_runs):
    run = stand_in_runs(recipe)

    # What Axolotl prepared is the export, row for row: input_ids and labels (masked tokens -100).
    prepared_dir = next(p.parent for p in (run.output_dir / "prepared").rglob("state.json"))
    prepared = {row["id"]: row for row in datasets.load_from_disk(str(prepared_dir))}
    exported = {row["id"]: row for row in datasets.load_dataset("parquet", data_files=str(run.data), split="train")}
    assert prepared.keys() == exported.keys() and len(exported) == 8
    for key, row in exported.items():
        assert (prepared[key]["input_ids"], prepared[key]["labels"]) == (row["input_ids"], row["labels"]), key

    # Two finite steps, each an epoch (gradient accumulation 8 > 4 micro-batches), trained on exactly
    # the labelled tokens of the rows not held out for evaluation (val_set_size 0.05: one row). No
    # padding is trained, although Llama-3's and Mistral's pad token falls back to their end of turn.
    state = json.loads((run.output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    assert all(math.isfinite(float(entry["loss"])) for entry in steps)
    labelled = [sum(label != -100 for label in row["labels"]) for row in exported.values()]
    assert int(steps[0]["tokens/trainable"]) in {sum(labelled) - held_out for held_out in labelled}

    # The LoRA adapter is written, on every linear layer (lora_target_linear).
    from safetensors import safe_open

    with safe_open(run.output_dir / "adapter_model.safetensors", "pt") as adapter:
        names = list(adapter.keys())
    assert {name.split(".lora_A")[0].rsplit(".", 1)[1] for name in names if ".lora_A" in name} == LINEAR_LAYERS
    assert sum(".lora_B" in name for name in names) == len(LINEAR_LAYERS) * 2  # two layers in a tiny model


@pytest.mark.slow
def test_the_trained_adapter_merges_and_scores_as_make_finetune_says(stand_in_runs, tmp_path):
    run = stand_in_runs("llama-3-8b-instruct")
    usage = usage_after_training(run.config)
    merge = next(line.split() for line in usage.splitlines() if "merge-lora" in line)
    assert merge[1:] == ["merge-lora", str(run.config)]
    _axolotl("axolotl", "merge-lora", run.config, cwd=tmp_path)
    merged = run.output_dir / "merged"
    assert f"--model {merged}" in usage

    # The merged model is the stand-in with the adapter folded into its linear layers, nothing else.
    import torch
    from safetensors.torch import load_file

    base, tuned = load_file(run.model_dir / "model.safetensors"), load_file(merged / "model.safetensors")
    assert base.keys() == tuned.keys()
    changed = {name.rsplit(".", 2)[-2] for name in base if not torch.equal(base[name], tuned[name])}
    assert changed == LINEAR_LAYERS

    summary = json.loads(
        run_curate("score", run.rows, "-o", tmp_path / "scored", "--model", merged, "--backend", "hf", "--json").stdout
    )
    assert summary["rows_scored"] == 8 and math.isfinite(summary["token_ppl"])
