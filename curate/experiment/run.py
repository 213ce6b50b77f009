"""The experiment's steps, in order: the data, scoring the training set, each mode's training set
(self-output and rephrase answer first), a fine-tune per run (and the epoch choice), an
evaluation of the base model and of each run, then the table."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from curate.evaluate import RESULTS
from curate.experiment.config import CONFIG, ExperimentConfig, ExperimentError, Mode, Run
from curate.experiment.diagnostics import heldout_nll_split, mask_diagnostics
from curate.experiment.layout import CHOICE, TOKENS, export_path, trained_model
from curate.experiment.steps import Steps, curate_command, run_command
from curate.experiment.table import TABLE_JSON, TABLE_MD, build_table, write_table
from curate.export import ExportOptions
from curate.files import Busy, hold_lock, read_jsonl, write_atomic
from curate.masking import DEFAULT_THRESHOLD
from curate.recipes import prepare_recipe, training_env

# The keys in which the rendered recipes of two modes may differ: where the data is, where the model goes,
# and (with `seeds`) the training seed.
DATA_KEYS = ("datasets.0.path", "dataset_prepared_path", "output_dir")
SEED_KEY = "seed"
LOCK = ".curate.lock"  # held by the one `curate experiment` running in the directory


def run_experiment(config: ExperimentConfig, output: Path, axolotl: str,
                   log: Callable[[str], None] = lambda message: None) -> dict:
    """Run (or finish) the experiment in `output`; returns the table (also in results.json/.md).
    One run at a time per directory: a second is refused (two would train into the same models)."""
    output = Path(output).resolve()
    if Path(config.train).is_file() and output in Path(config.train).resolve().parents:
        raise ExperimentError(f"train: {config.train} lies inside the output directory {output}; write elsewhere")
    output.mkdir(parents=True, exist_ok=True)
    try:
        lock = hold_lock(output / LOCK)
    except Busy as busy:
        raise ExperimentError(f"{output}: another curate experiment (PID {busy.holder}) is running in this directory; "
                              "wait for it to finish or stop it, or write elsewhere") from None
    with lock:
        return _run_steps(config, output, axolotl, log)


def _run_steps(config: ExperimentConfig, output: Path, axolotl: str, log: Callable[[str], None]) -> dict:
    from curate.models import resolve_model

    if not (output / CONFIG).exists():  # marks the directory as an experiment's; rewritten once the run is through
        (output / CONFIG).write_text(config.model_dump_json(indent=1) + "\n")
    steps = Steps(output, log)
    model_dir = resolve_model(config.model)
    modes, runs = config.parsed_modes(), config.runs()
    data_options = {k: getattr(config, k) for k in ("train", "train_limit", "eval_tasks")}
    if isinstance(config.eval_limit, dict):  # the limited copies are written by the data step
        data_options["eval_limit"] = config.eval_limit
    steps.run("data", data_options, lambda: prepare_data(config, output / "data"))
    train, held_out = output / "data" / "train.jsonl", json.loads((output / "data" / "eval.json").read_text())
    scored = output / "scored"
    steps.run("score", {"model": str(model_dir), "backend": config.backend}, lambda: run_command(
        curate_command("score", train, "-o", scored, "--model", model_dir, "--backend", config.backend, "--resume",
                       "--quiet"), output / "logs" / "score.log"))

    tasks = ",".join(f"{task}={held_out[task]}" if task in held_out else task for task in config.eval_tasks)
    limit = config.eval_limit if not isinstance(config.eval_limit, dict) else None
    eval_options = {"tasks": tasks, "limit": limit, "backend": config.backend, "max_new_tokens": config.max_new_tokens}

    gold_rows = _heldout_gold_rows(config, held_out)

    def evaluate(label: str, model: Path) -> None:
        command = curate_command("eval", model, "--tasks", tasks, "-o", output / "evals" / label, "--backend",
                                 config.backend, "--max-new-tokens", config.max_new_tokens,
                                 *(["--limit", limit] if limit else []))
        steps.run(f"eval/{label}", {**eval_options, "model": str(model)},
                  lambda: run_command(command, output / "logs" / f"eval-{label}.log"))
        if gold_rows:  # the target's held-out gold answers token by token, for `heldout_nll_split`
            steps.run(f"tokens/{label}", {"rows": str(gold_rows), "model": str(model), "backend": config.backend},
                      lambda: run_command(curate_command(
                          "score", gold_rows, "-o", output / TOKENS / label, "--model", model, "--backend",
                          config.backend, "--resume", "--quiet"), output / "logs" / f"tokens-{label}.log"))

    evaluate("base", model_dir)
    exported = set()
    for run in runs:
        if run.export_label not in exported:
            _export_mode(run, modes, config, model_dir, output, steps, log)
            exported.add(run.export_label)
    # Run by run: trained, its epoch chosen, evaluated, and the table rewritten, so that a run stopped
    # part way (the full config takes hours on CPUs) already shows the runs it finished.
    reference = None
    for done, run in enumerate(runs, start=1):
        reference = _finetune_mode(run, config, model_dir, output, steps, axolotl, reference)
        if config.checkpoint == "best-validation-nll":
            steps.run(f"choose/{run.label}", {"validation_limit": config.validation_limit, "backend": VALIDATION_BACKEND},
                      lambda run=run: choose_checkpoint(config, output, run.label))
        evaluate(run.label, trained_model(output, run.label))
        table = _table(config, output, runs[:done], model_dir)
        if done < len(runs):
            table["partial"] = {"runs_done": done, "runs": len(runs), "next": runs[done].label}
        write_table(table, output)
    (output / CONFIG).write_text(config.model_dump_json(indent=1) + "\n")
    log(f"wrote {output / TABLE_MD} and {output / TABLE_JSON}")
    return table


def _heldout_gold_rows(config: ExperimentConfig, held_out: dict) -> Path | None:
    """The target task's held-out rows, where they hold a gold answer to score (a generation task's;
    multiple-choice rows have options instead)."""
    from curate.benchmarks import TASKS

    if config.target not in held_out or (config.target in TASKS and TASKS[config.target].kind == "multiple_choice"):
        return None
    return Path(held_out[config.target])


def _table(config: ExperimentConfig, output: Path, runs: list[Run], model_dir: Path) -> dict:
    """The table of the runs evaluated so far."""
    table = build_table(output, config.target, runs, diagnostics=masked_by_mode(output, runs, model_dir))
    if (output / TOKENS / "base").is_dir():
        tau = next((mode.tau for mode in config.parsed_modes() if mode.tau is not None), DEFAULT_THRESHOLD)
        scored = {run.label: output / TOKENS / run.label for run in runs if (output / TOKENS / run.label).is_dir()}
        table["heldout_nll"] = heldout_nll_split(output / TOKENS / "base", scored, tau)
    table["recipe"] = recipe_check(config.recipe, output, [r.label for r in runs])
    table["config"] = {"seeds": config.seeds, "checkpoint": config.checkpoint, "epochs": config.epochs}
    return table


def masked_by_mode(output: Path, runs: list[Run], model_dir: Path) -> dict:
    """`mask_diagnostics` of each masking mode's training set (random masking: its first seed's draw)."""
    from curate.models import load_tokenizer

    first = {}
    for run in runs:
        if run.mode.name in ("stm", "random-mask"):
            first.setdefault(run.mode.label, run.export_label)
    if not first:
        return {}
    tokenizer = load_tokenizer(model_dir)
    return {label: mask_diagnostics(output / "scored", export_path(output, label), tokenizer) for label in first.values()}


def prepare_data(config: ExperimentConfig, folder: Path) -> None:
    """data/train.jsonl (the first train_limit training rows) and, where the training rows come out
    of an evaluated task's own evaluation set, data/<task>.jsonl: the rest of it, disjoint by id.

    A task with a train split (GSM8K, MBPP) trains on it; one without (ARC, PIQA, ...) is split by
    `curate.benchmarks.split_of(id)`: its `train` rows train, the others evaluate. Multiple-choice
    rows get their gold choice as `reference` (what rephrase shows the model). With a per-task
    `eval_limit` (a mapping), data/<task>.jsonl holds the first rows of each evaluated task."""
    from curate.benchmarks import TASKS, pull, split_of, write_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    held_out = {}
    if config.train in TASKS:
        source = pull([config.train])[config.train]
        if (source / "train.jsonl").exists():
            rows = read_jsonl(source / "train.jsonl")
        else:
            everything = read_jsonl(source / "test.jsonl")
            rows = [row for row in everything if split_of(row["id"]) == "train"]
            rest = [row for row in everything if split_of(row["id"]) != "train"]
            if config.train in config.eval_tasks:
                held_out[config.train] = str(folder / f"{config.train}.jsonl")
                write_jsonl(folder / f"{config.train}.jsonl", rest)
    else:
        rows = read_jsonl(Path(config.train))
    rows = rows[:config.train_limit] if config.train_limit else rows
    for row in rows:
        if "choices" in row and "gold" in row and "reference" not in row:
            row["reference"] = row["choices"][row["gold"]].strip()
    write_jsonl(folder / "train.jsonl", rows)
    if isinstance(config.eval_limit, dict):
        for task in config.eval_tasks:
            source = Path(held_out[task]) if task in held_out else pull([task])[task] / "test.jsonl"
            task_rows = read_jsonl(source)
            limit = config.eval_limit.get(task)
            write_jsonl(folder / f"{task}.jsonl", task_rows[:limit] if limit else task_rows)
            held_out[task] = str(folder / f"{task}.jsonl")
    (folder / "eval.json").write_text(json.dumps(held_out, indent=1) + "\n")


def _export_mode(run: Run, modes: list[Mode], config: ExperimentConfig, model_dir: Path, output: Path,
                 steps: Steps, log: Callable[[str], None]) -> None:
    """exports/<mode>.parquet; self-output and rephrase first answer, then score their answers."""
    mode = run.mode
    scored, target = output / "scored", export_path(output, run.export_label)
    logs = output / "logs"
    options: dict = {"mode": mode.name, "tau": mode.tau, "ratio": mode.ratio}
    if mode.name == "ground-truth":
        export_options = ExportOptions(mode="ground-truth")
    elif mode.name == "stm":
        export_options = ExportOptions(mode="stm", threshold=mode.tau, mask_ratio=mode.ratio)
    elif mode.name == "random-mask":
        stm = next(m for m in modes if m.name == "stm")
        stats = json.loads(export_path(output, stm.label).with_suffix(".stats.json").read_text())
        ratio = stats["masked_tokens"] / stats["target_tokens"]
        seed = config.seed if run.seed is None else run.seed
        options |= {"ratio": ratio, "seed": seed, "as_masked_as": stm.label}
        export_options = ExportOptions(mode="random-mask", mask_ratio=ratio, seed=seed)
    else:
        generated, generated_scored = output / "generated" / mode.name, output / "generated" / f"{mode.name}-scored"
        verify = _checker(config)
        backend = config.generation_backend or config.backend
        answer = {"verify": verify, "max_new_tokens": config.max_new_tokens, "backend": backend, "model": str(model_dir)}
        sampling = []
        if mode.name == "self-output" and (config.samples, config.temperature, config.top_p) != (1, 0.0, 1.0):
            answer |= {"samples": config.samples, "temperature": config.temperature, "top_p": config.top_p}
            sampling = ["--n", config.samples, "--temperature", config.temperature, "--top-p", config.top_p,
                        "--seed", config.seed]
        steps.run(f"generate/{mode.name}", answer, lambda: run_command(curate_command(
            "generate", output / "data" / "train.jsonl", "-o", generated, "--model", model_dir, "--backend",
            backend, "--verify", verify, "--max-new-tokens", config.max_new_tokens, "--resume", "--quiet",
            *sampling, *(["--rephrase"] if mode.name == "rephrase" else [])), logs / f"generate-{mode.name}.log"))
        steps.run(f"score/{mode.name}", {k: v for k, v in answer.items() if k != "backend"} | {"backend": config.backend},
                  lambda: run_command(curate_command(
                      "score", generated, "-o", generated_scored, "--model", model_dir, "--backend", config.backend,
                      "--resume", "--quiet"), logs / f"score-{mode.name}.log"))
        scored = generated_scored
        options |= {"on_wrong": config.on_wrong}
        export_options = ExportOptions(mode="self-output", on_wrong=config.on_wrong,
                                       ground_truth=output / "scored" if config.on_wrong == "ground-truth" else None)
    steps.run(f"export/{run.export_label}", options,
              lambda: _export(scored, target, export_options, model_dir, logs / f"export-{run.export_label}.log", log))


def _export(scored: Path, target: Path, options: ExportOptions, model_dir: Path, log_file: Path,
            log: Callable[[str], None]) -> None:
    """`curate export`, in this process (it loads no model): the tokenizer and weights checked
    against the scored set's manifest first; warnings to the log and to the user."""
    from curate.export import export
    from curate.store import scored_tokenizer

    stats = export(scored, target, options, scored_tokenizer(scored, str(model_dir), "export", check_model=True))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(asdict(stats), default=str) + "\n")
    for warning in stats.warnings:
        log(f"warning: {target.name}: {warning}")


def _checker(config: ExperimentConfig) -> str:
    """Free answers to multiple-choice rows are checked by the choice they name; others as configured."""
    from curate.benchmarks import TASKS

    if config.verify == "auto" and config.train in TASKS and TASKS[config.train].kind == "multiple_choice":
        return "choice"
    return config.verify


def _finetune_mode(run: Run, config: ExperimentConfig, model_dir: Path, output: Path, steps: Steps, axolotl: str,
                   reference: tuple[str, dict] | None) -> tuple[str, dict]:
    """configs/<run>.yml from the one recipe, checked to differ from the first run's only in
    DATA_KEYS (and the seed); then `axolotl train` (and `merge-lora` for a LoRA recipe)."""
    import yaml

    label, config_path = run.label, output / "configs" / f"{run.label}.yml"
    run_dir = output / "models" / label
    variables = {"BASE_MODEL": model_dir, "OUTPUT_DIR": run_dir,
                 **({"MAX_STEPS": config.max_steps} if config.max_steps else {}),
                 **({"EPOCHS": config.epochs} if config.epochs else {}),
                 **({"SEED": run.seed} if run.seed is not None else {})}
    data = export_path(output, run.export_label)
    prepare_recipe(config.recipe, data, {name: str(value) for name, value in variables.items()}, config_path)
    rendered = yaml.safe_load(config_path.read_text())
    if run.seed is not None and rendered.get(SEED_KEY) != run.seed:
        raise ExperimentError(f"{config.recipe}: `seeds` needs the recipe to take its training seed as "
                              f"`seed: ${{SEED:-...}}` (the rendered {config_path} has seed {rendered.get(SEED_KEY)!r})")
    if reference is None:
        reference = (label, rendered)
    allowed = DATA_KEYS + ((SEED_KEY,) if config.seeds else ())
    differing = [key for key in config_differences(reference[1], rendered) if key not in allowed]
    if differing:
        raise ExperimentError(f"{config_path}: the recipe for {label} differs from the one for {reference[0]} in "
                              f"{differing[0]}: only the data may differ between modes")
    recipe_text = Path(config.recipe).read_text()
    options = {"recipe": str(Path(config.recipe).resolve()), "recipe_text": recipe_text, "max_steps": config.max_steps,
               "data": str(data)}
    if config.seeds or config.epochs or config.checkpoint != "last":
        options |= {"seed": run.seed, "epochs": config.epochs, "checkpoint": config.checkpoint}
    env = training_env() | ({"PATH": f"{Path(axolotl).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
                            if os.sep in axolotl else {})
    keep_checkpoints = config.checkpoint == "best-validation-nll"

    def train() -> None:
        log_file = output / "logs" / f"train-{label}.log"
        run_command([axolotl, "train", config_path], log_file, env)
        if rendered.get("adapter"):
            run_command([axolotl, "merge-lora", config_path], log_file, env)
        for checkpoint in _checkpoints(run_dir):  # the last one holds the whole loss curve
            if (checkpoint / "trainer_state.json").exists():
                shutil.copy(checkpoint / "trainer_state.json", run_dir / "trainer_state.json")
        if not keep_checkpoints:
            for checkpoint in _checkpoints(run_dir):  # optimizer state: gigabytes, not needed to evaluate
                shutil.rmtree(checkpoint)

    steps.run(f"train/{label}", options, train)
    return reference


def _checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-<step> directories, in training order."""
    return sorted(Path(run_dir).glob("checkpoint-*"), key=lambda path: int(path.name.rsplit("-", 1)[1]))


# The epoch choice scores a few dozen rows per checkpoint: the HF engine starts in seconds, vLLM in ~30 s on CPU.
VALIDATION_BACKEND = "hf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "vocab.json", "merges.txt", "generation_config.json")


def choose_checkpoint(config: ExperimentConfig, output: Path, label: str) -> dict:
    """As the study picks its epoch: the checkpoint of lowest gold-answer NLL on the target task's
    validation split (never its test rows). Each checkpoint gets the tokenizer files so that it loads
    as a model; once the choice is written to models/<run>/checkpoint.json the other checkpoints are
    deleted, and so are the final weights beside them (the last epoch's checkpoint holds the same)."""
    from curate.evaluate import task_file

    run_dir = output / "models" / label
    checkpoints = _checkpoints(run_dir)
    if not checkpoints:
        raise ExperimentError(f"{run_dir}: no checkpoint-* directories; checkpoint: best-validation-nll needs a recipe "
                              "that saves every epoch (save_strategy: epoch)")
    validation = task_file(config.target, "validation")
    results = {}
    for checkpoint in checkpoints:
        for name in _TOKENIZER_FILES:
            if (run_dir / name).exists() and not (checkpoint / name).exists():
                shutil.copy(run_dir / name, checkpoint / name)
        folder = output / "validation" / label / checkpoint.name
        run_command(curate_command("eval", checkpoint, "--tasks", f"{config.target}={validation}", "-o", folder,
                                   "--backend", VALIDATION_BACKEND, "--gold-nll-only",
                                   *(["--limit", config.validation_limit] if config.validation_limit else [])),
                    output / "logs" / f"validation-{label}.log")
        state = json.loads((checkpoint / "trainer_state.json").read_text()) if (checkpoint / "trainer_state.json").exists() else {}
        results[checkpoint.name] = {"epoch": state.get("epoch"), "step": state.get("global_step"),
                                    "gold_nll": json.loads((folder / RESULTS).read_text())["tasks"][config.target]["gold_nll"]}
    chosen = min(results, key=lambda name: results[name]["gold_nll"])
    choice = {"chosen": chosen, "by": f"{config.target} validation gold NLL", "checkpoints": results}
    write_atomic(run_dir / CHOICE, (json.dumps(choice, indent=1) + "\n").encode())
    for checkpoint in checkpoints:
        if checkpoint.name != chosen:
            shutil.rmtree(checkpoint)
    for weights in run_dir.glob("*.safetensors"):
        weights.unlink()
    return choice


def recipe_check(recipe: str, output: Path, labels: list[str]) -> dict:
    """The record that every mode trained on the same recipe: where each mode's rendered config
    differs from the first mode's (only DATA_KEYS, or `_finetune_mode` refused to train)."""
    import yaml

    configs = {label: yaml.safe_load((Path(output) / "configs" / f"{label}.yml").read_text()) for label in labels}
    first = configs[labels[0]]
    return {"recipe": str(Path(recipe).resolve()), "compared_with": labels[0],
            "differences": {label: config_differences(first, rendered) for label, rendered in configs.items()}}


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two (nested) configs."""
    keys = (range(max(len(a), len(b))) if isinstance(a, list) else sorted(set(a) | set(b)))
    out = []
    for key in keys:
        name = f"{prefix}{key}"
        left = (a[key] if key < len(a) else None) if isinstance(a, list) else a.get(key)
        right = (b[key] if key < len(b) else None) if isinstance(b, list) else b.get(key)
        if isinstance(left, (dict, list)) and type(left) is type(right):
            out += config_differences(left, right, f"{name}.")
        elif left != right:
            out.append(name)
    return out
