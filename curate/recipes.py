"""Fill an Axolotl recipe's variables and check it against the exported data.

One recipe per model (`recipes/axolotl/<model>.yml`) serves every mode: the mode is the
data, so two modes' filled-in configs differ only in where the data is and where the model
goes. Recipes use `${NAME}` and `${NAME:-default}` placeholders: DATA (the exported training
file), BASE_MODEL, OUTPUT_DIR and a few settings. The base model must be the model the data
was scored with: token ids only mean something under the tokenizer that produced them, so a
mismatch is refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from curate.errors import CurateError
from curate.export import stats_path
from curate.store import refuse_overlap, write_atomic

_PLACEHOLDER = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::-([^}]*))?\}")


class RecipeError(CurateError):
    """A recipe that cannot be filled in, or whose base model does not fit the data."""


def render_recipe(text: str, variables: dict[str, str]) -> str:
    """Replace ${NAME} / ${NAME:-default}; an unset variable without a default is an error."""

    def fill(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if variables.get(name) not in (None, ""):
            return str(variables[name])
        if default is not None:
            return default
        raise RecipeError(f"the recipe needs {name} (pass it as {name}=... to make, or --var {name}=...)")

    return _PLACEHOLDER.sub(fill, text)


def data_stats(data: Path) -> dict:
    """The stats recorded beside an exported training file (tokenizer and model fingerprints)."""
    stats = stats_path(Path(data))
    if not stats.exists():
        raise RecipeError(f"{data}: no {stats.name} beside it; was it written by `curate export`?")
    return json.loads(stats.read_text())


def check_base_model(base_model: str, data: Path, allow_other_model: bool = False) -> None:
    """Refuse a recipe whose base model tokenizes differently from the exported data, or
    (for a local directory) is another model than the one that scored it."""
    from curate.models import load_tokenizer, model_fingerprint, tokenizer_fingerprint
    from curate.store import OTHER_MODEL_WHY

    try:
        if Path(base_model).is_dir():
            tokenizer = load_tokenizer(Path(base_model))
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base_model)
    except OSError as error:
        raise RecipeError(
            f"cannot load the tokenizer of base_model {base_model!r} to check it "
            f"({error.__class__.__name__}); give a local directory as BASE_MODEL=..., or --no-check"
        ) from None
    stats = data_stats(data)
    wanted, found = stats["tokenizer"], tokenizer_fingerprint(tokenizer)
    if wanted != found:
        raise RecipeError(
            f"{data} was scored with another tokenizer ({wanted}) than the recipe's base_model "
            f"{base_model} ({found}); fine-tune the model you scored with, or score again with --model"
        )
    scored_with = stats.get("model_fingerprint")
    if Path(base_model).is_dir() and scored_with and not allow_other_model:
        found = model_fingerprint(Path(base_model))
        if found != scored_with:
            raise RecipeError(
                f"{data} was scored with the model {stats.get('model')} (fingerprint {scored_with}), not the "
                f"recipe's base_model {base_model} ({found}): {OTHER_MODEL_WHY}. Score again with "
                "--model, or pass --allow-other-model"
            )


def prepare_recipe(
    recipe: Path,
    data: Path,
    variables: dict[str, str],
    output: Path,
    check: bool = True,
    allow_other_model: bool = False,
) -> Path:
    """Render `recipe` for `data` into `output`, checked; returns the written path. OUTPUT_DIR
    defaults to `output` without its suffix: the model is written beside its config, under its name."""
    import yaml

    recipe, data = Path(recipe), Path(data).resolve()
    if not data.exists():
        raise RecipeError(f"{data}: no such training file (run `curate export` first)")
    defaults = {"DATA": str(data), "OUTPUT_DIR": str(Path(output).resolve().with_suffix(""))}
    if recipe.stem == "smollm2-135m-instruct":  # the bundled model: no BASE_MODEL to give
        from curate.models import default_model_dir

        defaults["BASE_MODEL"] = str(default_model_dir())
    merged = {
        **defaults,
        **{k: v for k, v in os.environ.items() if k in ("BASE_MODEL", "OUTPUT_DIR", "MAX_STEPS")},
        **variables,
    }
    rendered = render_recipe(recipe.read_text(), merged)
    config = yaml.safe_load(rendered)
    if check:
        check_base_model(str(config["base_model"]), data, allow_other_model)
    output.parent.mkdir(parents=True, exist_ok=True)
    for source in (recipe, data):  # the filled-in config never replaces the recipe or the data
        refuse_overlap(source, output)
    write_atomic(output, rendered.encode())
    return output


def training_env(environ: dict | None = None) -> dict[str, str]:
    """What `axolotl train` needs added to its environment here. It runs through `accelerate launch`,
    which sets OMP_NUM_THREADS=1 when the variable is unset (and `--cpu` is not given), so a fine-tune
    on a machine without a GPU used one core: 1.9x slower on 2 cores (`bench/train_threads.py`).
    Without a GPU (no `nvidia-smi`) and with the variable unset, it becomes the usable cores."""
    import shutil

    environ = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" in environ or shutil.which("nvidia-smi", path=environ.get("PATH")):
        return {}
    return {"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}


def usage_after_training(config: Path, axolotl: str = ".venv-axolotl/bin/axolotl") -> str:
    """What `make finetune` prints once `axolotl train CONFIG` is done: where the trained
    weights are, and how to evaluate them with curate. A LoRA adapter is merged into its
    base model first (`axolotl merge-lora` writes OUTPUT_DIR/merged), since curate loads
    whole models."""
    import yaml

    settings = yaml.safe_load(Path(config).read_text())
    output_dir = Path(settings["output_dir"])
    if settings.get("adapter"):
        model = output_dir / "merged"
        lines = [
            f"LoRA adapter: {output_dir}/adapter_model.safetensors (base model {settings['base_model']})",
            f"Merge it into the base model (writes {model}):",
            f"  {axolotl} merge-lora {config}",
        ]
    else:
        model = output_dir
        lines = [f"Fine-tuned model: {model}"]
    lines += [
        "Evaluate it with curate on held-out data with `reference` answers (and the base model, to compare):",
        f"  curate generate held-out.jsonl -o out/eval/generated --model {model}   # answers right / wrong",
        f"  curate score held-out.jsonl -o out/eval/scored --model {model}         # perplexity of the references",
    ]
    return "\n".join(lines)
