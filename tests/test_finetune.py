"""Recipes and `make finetune`: real Axolotl (its own venv) trains on the exported data."""

import json
import math
import subprocess
from pathlib import Path

import datasets
import pytest

from conftest import ROOT, run_curate
from curate.export import ExportOptions, export
from curate.recipes import RecipeError, prepare_recipe, training_env, usage_after_training

AXOLOTL_BIN = ROOT / ".venv-axolotl" / "bin"
CPU_RECIPE = ROOT / "recipes" / "axolotl" / "smollm2-135m-instruct.yml"
GPU_RECIPES = sorted(p for p in (ROOT / "recipes" / "axolotl").glob("*.yml") if p != CPU_RECIPE)
AXOLOTL_ENV = {"AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}


def _axolotl(*args, cwd: Path) -> subprocess.CompletedProcess:
    assert (AXOLOTL_BIN / "axolotl").exists(), "Axolotl's environment is missing: run `make axolotl`"
    import os

    env = {**os.environ, **AXOLOTL_ENV, "PATH": f"{AXOLOTL_BIN}:{os.environ['PATH']}"}
    result = subprocess.run(
        [str(AXOLOTL_BIN / args[0]), *map(str, args[1:])], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def stm_export(tmp_path_factory, scored_sample, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("train") / "train-stm.parquet"
    export(scored_sample, out, ExportOptions(mode="stm", threshold=2.5), tokenizer)
    return out


def test_a_recipe_whose_base_model_tokenizes_differently_is_refused(tmp_path, stm_export, model_dir):
    from transformers import AutoTokenizer

    other = tmp_path / "other-model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(RecipeError, match="another tokenizer"):
        prepare_recipe(CPU_RECIPE, stm_export, {"BASE_MODEL": str(other)}, tmp_path / "c.yml")
    refused = run_curate(
        "check-recipe",
        CPU_RECIPE,
        "--data",
        stm_export,
        "-o",
        tmp_path / "c.yml",
        "--var",
        f"BASE_MODEL={other}",
        check=False,
    )
    assert refused.returncode == 1 and "another tokenizer" in refused.stderr


def test_after_training_make_finetune_says_where_the_model_is_and_how_to_score_with_it(tmp_path, stm_export):
    lora = prepare_recipe(
        GPU_RECIPES[0], stm_export, {"OUTPUT_DIR": str(tmp_path / "lora")}, tmp_path / "lora.yml", check=False
    )
    usage = usage_after_training(lora)
    assert f"{tmp_path / 'lora'}/adapter_model.safetensors" in usage
    assert f"axolotl merge-lora {lora}" in usage and f"--model {tmp_path / 'lora' / 'merged'}" in usage
    full = prepare_recipe(CPU_RECIPE, stm_export, {"OUTPUT_DIR": str(tmp_path / "full")}, tmp_path / "full.yml")
    usage = usage_after_training(full)
    assert "merge-lora" not in usage and f"--model {tmp_path / 'full'} " in usage


def test_the_axolotl_environment_reports_its_versions(tmp_path):
    report = _axolotl("python", ROOT / "recipes" / "axolotl" / "check_install.py", cwd=tmp_path).stdout
    for package in ("axolotl 0.19.0", "torch ", "transformers ", "bitsandbytes ", "flash-attn "):
        assert package in report
    assert "CUDA available:" in report


@pytest.mark.slow
def test_every_gpu_recipe_passes_axolotls_own_schema(tmp_path, stm_export):
    configs = [
        prepare_recipe(
            recipe,
            stm_export,
            {"OUTPUT_DIR": str(tmp_path / "o")},
            tmp_path / f"{recipe.stem}.yml",
            check=False,
        )
        for recipe in GPU_RECIPES
    ]
    assert len(configs) == 3
    result = _axolotl("python", ROOT / "recipes" / "axolotl" / "validate.py", *configs, cwd=tmp_path)
    assert result.stdout.count("ok ") == 3
    # ... and the schema really rejects a broken one.
    broken = tmp_path / "broken.yml"
    broken.write_text(configs[0].read_text().replace("micro_batch_size: 2", "micro_batch_size: two"))
    with pytest.raises(AssertionError, match="failed"):
        _axolotl("python", ROOT / "recipes" / "axolotl" / "validate.py", broken, cwd=tmp_path)


@pytest.mark.slow
def test_axolotl_trains_on_the_stm_export_on_cpu(tmp_path, stm_export, sample_path):
    output_dir = tmp_path / "run"
    config = prepare_recipe(
        CPU_RECIPE, stm_export, {"OUTPUT_DIR": str(output_dir), "MAX_STEPS": "10"}, tmp_path / "config.yml"
    )

    # (a) What Axolotl prepared carries exactly our labels: masked tokens stay -100.
    _axolotl("axolotl", "preprocess", config, cwd=tmp_path)
    prepared_dir = next(p.parent for p in (output_dir / "prepared").rglob("state.json"))
    prepared = {row["id"]: row for row in datasets.load_from_disk(str(prepared_dir))}
    exported = {row["id"]: row for row in datasets.load_dataset("parquet", data_files=str(stm_export), split="train")}
    assert prepared.keys() == exported.keys()
    for key, row in exported.items():
        assert prepared[key]["input_ids"] == row["input_ids"]
        assert prepared[key]["labels"] == row["labels"]
    # Some response tokens are masked inside answers (a -100 after the first trained token).
    assert any(
        -100 in labels[next(i for i, t in enumerate(labels) if t != -100) :]
        for labels in (row["labels"] for row in exported.values())
    )

    # (b) Training runs, and the loss is finite and falls.
    _axolotl("axolotl", "train", config, cwd=tmp_path)
    state = json.loads(next(output_dir.glob("checkpoint-*/trainer_state.json")).read_text())
    losses = [float(entry["loss"]) for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 10 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3

    # (c) The trained model loads, and curate scores with it.
    few = tmp_path / "few.jsonl"
    few.write_text("\n".join(sample_path.read_text().splitlines()[:6]) + "\n")
    summary = json.loads(
        run_curate("score", few, "-o", tmp_path / "rescored", "--model", output_dir, "--backend", "hf", "--json").stdout
    )
    assert summary["rows_scored"] == 6 and math.isfinite(summary["token_ppl"])


def test_a_fine_tune_without_a_gpu_trains_on_every_core_not_the_launchers_one(tmp_path):
    """`axolotl train` runs `accelerate launch`, which gives the training process one thread when
    OMP_NUM_THREADS is unset; with `training_env` (what `curate experiment` and `make finetune` add)
    it gets the usable cores. The real launcher from Axolotl's environment, a script reporting torch's threads."""
    import os

    script = tmp_path / "threads.py"
    script.write_text("import torch\nprint('threads', torch.get_num_threads())\n")
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    environ |= AXOLOTL_ENV | {"PATH": f"{AXOLOTL_BIN}:{environ['PATH']}"}

    def threads(env: dict) -> int:
        result = subprocess.run(
            [str(AXOLOTL_BIN / "accelerate"), "launch", str(script)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return int(next(line for line in result.stdout.splitlines() if line.startswith("threads")).split()[1])

    assert threads(environ) == 1  # the launcher's own default, which cost CPU fine-tunes half their speed on 2 cores
    assert threads(environ | training_env(environ)) == len(os.sched_getaffinity(0))
    assert training_env(environ | {"OMP_NUM_THREADS": "3"}) == {}  # the user's setting wins
