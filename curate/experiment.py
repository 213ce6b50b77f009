"""`curate experiment`: the study's comparison, one command. For one model, one training set
and several modes (ground truth, STM, a random-mask control, self-output, rephrase), it scores,
exports, fine-tunes each mode with the same Axolotl recipe, evaluates the base model and every
fine-tuned one, and tables TI, BWT and the absolute changes with their intervals.

Every step runs the `curate` command line (or `axolotl`) in a subprocess, so no two model
engines ever share a process, and leaves a marker `steps/<step>.json` holding its options when it
finishes: a rerun skips finished steps, and refuses (naming the option) a step that was finished
with other options. Layout of the output directory:

    experiment.json      the config as run          data/        train.jsonl, held-out eval rows
    scored/              the training set, scored   exports/     <mode>.parquet (+ .stats.json)
    configs/<mode>.yml   the rendered recipes       models/      fine-tuned models
    evals/<base|mode>/   `curate eval` results      results.json, results.md: the table
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from curate.evaluate import RESULTS, forgetting

CONFIG = "experiment.json"
TABLE_JSON, TABLE_MD = "results.json", "results.md"
MODE_NAMES = ("ground-truth", "stm", "random-mask", "self-output", "rephrase")
# The keys in which the rendered recipes of two modes may differ: where the data is, where the model goes.
DATA_KEYS = ("datasets.0.path", "dataset_prepared_path", "output_dir")


class ExperimentError(Exception):
    """A config or a resume the user can fix: the message names the file and the field."""


@dataclass(frozen=True)
class Mode:
    """One way of building the training set. `stm` takes `tau` (default 2.5) or `ratio`;
    `random-mask` masks as many tokens as the experiment's first STM mode did."""

    name: str
    tau: float | None = None
    ratio: float | None = None

    @property
    def label(self) -> str:
        if self.tau is not None:
            return f"{self.name}-tau{self.tau:g}"
        return f"{self.name}-ratio{self.ratio:g}" if self.ratio is not None else self.name

    @classmethod
    def parse(cls, spec: str, where: str) -> "Mode":
        """`ground-truth`, `stm`, `stm:tau=2`, `stm:ratio=0.2`, `random-mask`, `self-output`, `rephrase`."""
        name, _, setting = str(spec).partition(":")
        if name not in MODE_NAMES:
            raise ExperimentError(f"{where}: unknown mode {spec!r} (expected one of {', '.join(MODE_NAMES)})")
        if not setting:
            return cls(name, tau=2.5 if name == "stm" else None)
        key, _, value = setting.partition("=")
        if name != "stm" or key not in ("tau", "ratio"):
            raise ExperimentError(f"{where}: {spec!r}: only stm takes a setting, tau=T or ratio=R")
        try:
            return cls(name, **{key: float(value)})
        except ValueError:
            raise ExperimentError(f"{where}: {spec!r}: {key} must be a number") from None


@dataclass
class ExperimentConfig:
    """What `curate experiment` runs (a YAML or JSON file with these fields)."""

    train: str  # a benchmark task (`curate benchmarks list`) or a training file
    target: str  # the task trained for: its change is TI
    eval_tasks: list[str]  # every task evaluated, the target among them; the others make BWT
    modes: list[str] = field(default_factory=lambda: ["ground-truth", "stm", "random-mask", "self-output"])
    recipe: str = "recipes/axolotl/smollm2-135m-instruct/ground-truth.yml"  # one recipe, for every mode
    model: str = "default"
    train_limit: int | None = None  # the first N training rows
    eval_limit: int | None = None  # the first N rows of each evaluation task
    max_steps: int | None = None  # the recipe's MAX_STEPS
    backend: str = "hf"  # of scoring, generation and evaluation
    max_new_tokens: int = 256  # self-output, rephrase and generation tasks
    on_wrong: str = "drop"  # self-output/rephrase: prompts without a verified answer (drop | ground-truth)
    verify: str = "auto"  # checker of self-output/rephrase answers (auto on multiple-choice rows: choice)
    seed: int = 0  # of the random-mask draw

    @classmethod
    def load(cls, path: Path) -> "ExperimentConfig":
        import yaml

        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
        except (OSError, yaml.YAMLError) as error:
            raise ExperimentError(f"{path}: cannot read it as YAML or JSON: {error}") from None
        if not isinstance(raw, dict):
            raise ExperimentError(f"{path}: expected a mapping of fields ({', '.join(f.name for f in fields(cls))})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ExperimentError(f"{path}: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
        missing = [name for name in ("train", "target", "eval_tasks") if name not in raw]
        if missing:
            raise ExperimentError(f"{path}: the field {missing[0]!r} is required")
        for name in ("train_limit", "eval_limit", "max_steps", "max_new_tokens", "seed"):
            if raw.get(name) is not None and (not isinstance(raw[name], int) or isinstance(raw[name], bool)):
                raise ExperimentError(f"{path}: {name}: expected a whole number, not {raw[name]!r}")
        for name in ("modes", "eval_tasks"):
            if name in raw and not isinstance(raw[name], (list, str)):
                raise ExperimentError(f"{path}: {name}: expected a list, not {raw[name]!r}")
        config = cls(**raw)
        config.check(str(path))
        return config

    def check(self, where: str) -> None:
        from curate.benchmarks import TASKS

        if isinstance(self.eval_tasks, str):
            self.eval_tasks = [t for t in self.eval_tasks.split(",") if t]
        for task in [*self.eval_tasks, self.target]:
            if task not in TASKS:
                raise ExperimentError(f"{where}: eval_tasks/target: unknown task {task!r} (known: {', '.join(TASKS)})")
        if self.target not in self.eval_tasks:
            raise ExperimentError(f"{where}: eval_tasks must include the target {self.target!r}")
        if self.train not in TASKS and not Path(self.train).is_file():
            raise ExperimentError(f"{where}: train: {self.train!r} is neither a benchmark task nor a file")
        if not self.modes:
            raise ExperimentError(f"{where}: modes: name at least one")
        labels = [m.label for m in self.parsed_modes(f"{where}: modes")]
        if len(set(labels)) != len(labels):
            raise ExperimentError(f"{where}: modes: {labels} names a mode twice")
        if any(m.name == "random-mask" for m in self.parsed_modes(where)) and \
                not any(m.name == "stm" for m in self.parsed_modes(where)):
            raise ExperimentError(f"{where}: modes: random-mask masks as many tokens as STM did, so it needs an stm mode")
        if not Path(self.recipe).is_file():
            raise ExperimentError(f"{where}: recipe: no such file {self.recipe}")
        if self.on_wrong not in ("drop", "ground-truth"):
            raise ExperimentError(f"{where}: on_wrong: expected drop or ground-truth, not {self.on_wrong!r}")

    def parsed_modes(self, where: str = "modes") -> list[Mode]:
        return [Mode.parse(spec, where) for spec in self.modes]


# ---------------------------------------------------------------- steps and markers


class Steps:
    """Run-once steps: each leaves `steps/<name>.json` with its options when it finishes."""

    def __init__(self, root: Path, log: Callable[[str], None]):
        self.root, self.log, self.count = Path(root), log, 0

    def run(self, name: str, options: dict, action: Callable[[], None]) -> bool:
        """Run `action` unless the step finished before with these options; True if it ran."""
        self.count += 1
        marker = self.root / "steps" / f"{name.replace('/', '--')}.json"
        options = json.loads(json.dumps(options, default=str))
        if marker.exists():
            done = json.loads(marker.read_text())["options"]
            changed = [k for k in sorted(set(done) | set(options)) if done.get(k) != options.get(k)]
            if changed:
                key = changed[0]
                raise ExperimentError(
                    f"{self.root}: the step {name} was finished with {key}={done.get(key)!r}, this run asks for "
                    f"{key}={options.get(key)!r}; use another output directory, or delete {marker} to redo the step")
            self.log(f"[{self.count}] {name}: done before, skipped")
            return False
        self.log(f"[{self.count}] {name} ...")
        started = time.monotonic()
        action()
        seconds = round(time.monotonic() - started, 1)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"step": name, "options": options, "seconds": seconds}, indent=1) + "\n")
        self.log(f"[{self.count}] {name}: done in {seconds:.0f} s")
        return True


def run_command(command: list[str], log_file: Path, env: dict | None = None) -> None:
    """One step's subprocess, its output kept in `log_file`; a failure shows the log's tail."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(map(str, command))}\n")
        log.flush()
        result = subprocess.run(list(map(str, command)), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    if result.returncode != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise ExperimentError(f"`{' '.join(map(str, command[:3]))} ...` failed ({result.returncode}); "
                              f"its output is in {log_file}:\n{tail}")


def curate_command(*args) -> list[str]:
    return [sys.executable, "-m", "curate", *map(str, args)]


# ---------------------------------------------------------------- the experiment


def run_experiment(config: ExperimentConfig, output: Path, axolotl: str,
                   log: Callable[[str], None] = lambda message: None) -> dict:
    """Run (or finish) the experiment in `output`; returns the table (also in results.json/.md)."""
    from curate.models import resolve_model

    output = Path(output).resolve()
    if Path(config.train).is_file() and output in Path(config.train).resolve().parents:
        raise ExperimentError(f"train: {config.train} lies inside the output directory {output}; write elsewhere")
    output.mkdir(parents=True, exist_ok=True)
    if not (output / CONFIG).exists():  # marks the directory as an experiment's; rewritten once the run is through
        (output / CONFIG).write_text(json.dumps(asdict(config), indent=1) + "\n")
    steps = Steps(output, log)
    model_dir = resolve_model(config.model)
    modes = config.parsed_modes()
    data_options = {k: getattr(config, k) for k in ("train", "train_limit", "eval_tasks")}
    steps.run("data", data_options, lambda: prepare_data(config, output / "data"))
    train, held_out = output / "data" / "train.jsonl", json.loads((output / "data" / "eval.json").read_text())
    scored = output / "scored"
    steps.run("score", {"model": str(model_dir), "backend": config.backend}, lambda: run_command(
        curate_command("score", train, "-o", scored, "--model", model_dir, "--backend", config.backend, "--overwrite",
                       "--quiet"), output / "logs" / "score.log"))

    for mode in modes:
        _export_mode(mode, modes, config, model_dir, output, steps)
    reference = None
    for mode in modes:
        reference = _finetune_mode(mode, config, model_dir, output, steps, axolotl, reference)

    tasks = ",".join(f"{task}={held_out[task]}" if task in held_out else task for task in config.eval_tasks)
    eval_options = {"tasks": tasks, "limit": config.eval_limit, "backend": config.backend,
                    "max_new_tokens": config.max_new_tokens}
    for label, model in [("base", model_dir), *((m.label, trained_model(output, m.label)) for m in modes)]:
        command = curate_command("eval", model, "--tasks", tasks, "-o", output / "evals" / label, "--backend",
                                 config.backend, "--max-new-tokens", config.max_new_tokens,
                                 *(["--limit", config.eval_limit] if config.eval_limit else []))
        steps.run(f"eval/{label}", {**eval_options, "model": str(model)},
                  lambda command=command, label=label: run_command(command, output / "logs" / f"eval-{label}.log"))
    table = build_table(output, config.target, [m.label for m in modes])
    table["recipe"] = recipe_check(config.recipe, output, [m.label for m in modes])
    write_table(table, output)
    (output / CONFIG).write_text(json.dumps(asdict(config), indent=1) + "\n")
    log(f"wrote {output / TABLE_MD} and {output / TABLE_JSON}")
    return table


def prepare_data(config: ExperimentConfig, folder: Path) -> None:
    """data/train.jsonl (the first train_limit training rows) and, where the training rows come out
    of an evaluated task's own evaluation set, data/<task>.jsonl: the rest of it, disjoint by id.

    A task with a train split (GSM8K, MBPP) trains on it; one without (ARC, PIQA, ...) is split by
    `curate.benchmarks.split_of(id)`: its `train` rows train, the others evaluate. Multiple-choice
    rows get their gold choice as `reference` (what rephrase shows the model)."""
    from curate.benchmarks import TASKS, pull, split_of, write_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    held_out = {}
    if config.train in TASKS:
        source = pull([config.train])[config.train]
        if (source / "train.jsonl").exists():
            rows = _read_jsonl(source / "train.jsonl")
        else:
            everything = _read_jsonl(source / "test.jsonl")
            rows = [row for row in everything if split_of(row["id"]) == "train"]
            rest = [row for row in everything if split_of(row["id"]) != "train"]
            if config.train in config.eval_tasks:
                held_out[config.train] = str(folder / f"{config.train}.jsonl")
                write_jsonl(folder / f"{config.train}.jsonl", rest)
    else:
        rows = _read_jsonl(Path(config.train))
    rows = rows[:config.train_limit] if config.train_limit else rows
    for row in rows:
        if "choices" in row and "gold" in row and "reference" not in row:
            row["reference"] = row["choices"][row["gold"]].strip()
    write_jsonl(folder / "train.jsonl", rows)
    (folder / "eval.json").write_text(json.dumps(held_out, indent=1) + "\n")


def _export_mode(mode: Mode, modes: list[Mode], config: ExperimentConfig, model_dir: Path, output: Path,
                 steps: Steps) -> None:
    """exports/<mode>.parquet; self-output and rephrase first answer, then score their answers."""
    scored, target = output / "scored", export_path(output, mode.label)
    logs = output / "logs"
    options: dict = {"mode": mode.name, "tau": mode.tau, "ratio": mode.ratio}
    args = ["--model", model_dir, "--quiet"]
    if mode.name == "ground-truth":
        args += ["--mode", "ground-truth"]
    elif mode.name == "stm":
        args += ["--mode", "stm", *(["--threshold", mode.tau] if mode.tau is not None else ["--mask-ratio", mode.ratio])]
    elif mode.name == "random-mask":
        stm = next(m for m in modes if m.name == "stm")
        stats = json.loads(export_path(output, stm.label).with_suffix(".stats.json").read_text())
        ratio = stats["masked_tokens"] / stats["target_tokens"]
        options |= {"ratio": ratio, "seed": config.seed, "as_masked_as": stm.label}
        args += ["--mode", "random-mask", "--mask-ratio", repr(ratio), "--seed", config.seed]
    else:
        generated, generated_scored = output / "generated" / mode.name, output / "generated" / f"{mode.name}-scored"
        verify = _checker(config)
        answer = {"verify": verify, "max_new_tokens": config.max_new_tokens, "backend": config.backend, "model": str(model_dir)}
        steps.run(f"generate/{mode.name}", answer, lambda: run_command(curate_command(
            "generate", output / "data" / "train.jsonl", "-o", generated, "--model", model_dir, "--backend",
            config.backend, "--verify", verify, "--max-new-tokens", config.max_new_tokens, "--overwrite", "--quiet",
            *(["--rephrase"] if mode.name == "rephrase" else [])), logs / f"generate-{mode.name}.log"))
        steps.run(f"score/{mode.name}", answer, lambda: run_command(curate_command(
            "score", generated, "-o", generated_scored, "--model", model_dir, "--backend", config.backend,
            "--overwrite", "--quiet"), logs / f"score-{mode.name}.log"))
        scored = generated_scored
        options |= {"on_wrong": config.on_wrong}
        args += ["--mode", "self-output", "--on-wrong", config.on_wrong,
                 *(["--ground-truth", output / "scored"] if config.on_wrong == "ground-truth" else [])]
    steps.run(f"export/{mode.label}", options, lambda: run_command(
        curate_command("export", scored, "-o", target, *args), logs / f"export-{mode.label}.log"))


def _checker(config: ExperimentConfig) -> str:
    """Free answers to multiple-choice rows are checked by the choice they name; others as configured."""
    from curate.benchmarks import TASKS

    if config.verify == "auto" and config.train in TASKS and TASKS[config.train].kind == "multiple_choice":
        return "choice"
    return config.verify


def _finetune_mode(mode: Mode, config: ExperimentConfig, model_dir: Path, output: Path, steps: Steps, axolotl: str,
                   reference: tuple[str, dict] | None) -> tuple[str, dict]:
    """configs/<mode>.yml from the one recipe, checked to differ from the first mode's only in
    DATA_KEYS; then `axolotl train` (and `merge-lora` for a LoRA recipe)."""
    import yaml

    label, config_path = mode.label, output / "configs" / f"{mode.label}.yml"
    run_dir = output / "models" / label
    variables = {"BASE_MODEL": model_dir, "OUTPUT_DIR": run_dir, **({"MAX_STEPS": config.max_steps} if config.max_steps else {})}
    run_command(curate_command("check-recipe", config.recipe, "--data", export_path(output, label), "-o", config_path,
                               *(arg for name, value in variables.items() for arg in ("--var", f"{name}={value}"))),
                output / "logs" / f"check-recipe-{label}.log")
    rendered = yaml.safe_load(config_path.read_text())
    if reference is None:
        reference = (label, rendered)
    differing = [key for key in config_differences(reference[1], rendered) if key not in DATA_KEYS]
    if differing:
        raise ExperimentError(f"{config_path}: the recipe for {label} differs from the one for {reference[0]} in "
                              f"{differing[0]}: only the data may differ between modes")
    recipe_text = Path(config.recipe).read_text()
    options = {"recipe": str(Path(config.recipe).resolve()), "recipe_text": recipe_text, "max_steps": config.max_steps,
               "data": str(export_path(output, label))}
    env = {"PATH": f"{Path(axolotl).parent}{os.pathsep}{os.environ.get('PATH', '')}"} if os.sep in axolotl else {}

    def train() -> None:
        log_file = output / "logs" / f"train-{label}.log"
        run_command([axolotl, "train", config_path], log_file, env)
        if rendered.get("adapter"):
            run_command([axolotl, "merge-lora", config_path], log_file, env)
        for checkpoint in run_dir.glob("checkpoint-*"):  # optimizer state: gigabytes, not needed to evaluate
            if (checkpoint / "trainer_state.json").exists():
                shutil.copy(checkpoint / "trainer_state.json", run_dir / "trainer_state.json")
            shutil.rmtree(checkpoint)

    steps.run(f"train/{label}", options, train)
    return reference


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


def export_path(output: Path, label: str) -> Path:
    return output / "exports" / f"{label}.parquet"


def trained_model(output: Path, label: str) -> Path:
    """The directory `curate eval` loads: the merged model for a LoRA recipe, else Axolotl's output."""
    run_dir = output / "models" / label
    return run_dir / "merged" if (run_dir / "merged").is_dir() else run_dir


# ---------------------------------------------------------------- the table


def build_table(output: Path, target: str, labels: list[str]) -> dict:
    """Scores of the base model and of each mode, and per mode TI, BWT and the absolute change of
    every task, each with its 95% interval (`curate.evaluate.forgetting`)."""
    base_dir = Path(output) / "evals" / "base"
    scores = {label: _scores(Path(output) / "evals" / label) for label in ["base", *labels]}
    modes = {}
    for label in labels:
        result = forgetting(base_dir, Path(output) / "evals" / label, target)
        stats = json.loads(export_path(Path(output), label).with_suffix(".stats.json").read_text())
        modes[label] = {"ti": result.ti, "ti_interval": result.ti_interval, "bwt": result.bwt,
                        "bwt_interval": result.bwt_interval,
                        "absolute": {task: {"change": change, "interval": interval}
                                     for task, (change, interval) in result.absolute.items()},
                        "examples": stats["examples_out"], "trained_tokens": stats["trained_tokens"],
                        "masked_ratio": stats["masked_ratio"],
                        "final_loss": _final_loss(Path(output) / "models" / label)}
    tasks = list(scores["base"])
    return {"target": target, "tasks": tasks, "scores": scores, "modes": modes}


def _scores(results_dir: Path) -> dict:
    summary = json.loads((results_dir / RESULTS).read_text())
    return {task: {"score": s["score"], "interval": s["interval"], "metric": s["metric"], "examples": s["examples"],
                   "gold_nll": s["gold_nll"]} for task, s in summary["tasks"].items()}


def _final_loss(run_dir: Path) -> float | None:
    state = run_dir / "trainer_state.json"
    if not state.exists():
        return None
    losses = [entry["loss"] for entry in json.loads(state.read_text())["log_history"] if "loss" in entry]
    return losses[-1] if losses else None


def write_table(table: dict, output: Path) -> None:
    (Path(output) / TABLE_JSON).write_text(json.dumps(table, indent=1) + "\n")
    (Path(output) / TABLE_MD).write_text(table_markdown(table))


def table_markdown(table: dict) -> str:
    tasks, target = table["tasks"], table["target"]
    named = [f"{t} (target)" if t == target else t for t in tasks]
    lines = ["| model | " + " | ".join(named) + " |", "|---|" + "---|" * len(tasks)]
    for label, scores in table["scores"].items():
        lines.append(f"| {label} | " + " | ".join(_with_interval(scores[t]["score"], scores[t]["interval"], "{:.3f}")
                                               for t in tasks) + " |")
    lines += ["", "Gold-answer NLL per token (lower: the model finds the reference answers likelier):", "",
              "| model | " + " | ".join(named) + " |", "|---|" + "---|" * len(tasks)]
    for label, scores in table["scores"].items():
        lines.append(f"| {label} | " + " | ".join(_nll(scores[t]["gold_nll"]) for t in tasks) + " |")
    lines += ["", f"| mode | trained examples | masked | TI ({target}) | BWT | "
              + " | ".join(f"Δ {t}" for t in tasks) + " |", "|---|---|---|---|---|" + "---|" * len(tasks)]
    for label, row in table["modes"].items():
        changes = [_with_interval(row["absolute"][t]["change"], row["absolute"][t]["interval"], "{:+.3f}") for t in tasks]
        lines.append(f"| {label} | {row['examples']} | {row['masked_ratio']:.1%} | "
                     f"{_with_interval(row['ti'], row['ti_interval'], '{:+.1%}')} | "
                     f"{_with_interval(row['bwt'], row['bwt_interval'], '{:+.1%}')} | " + " | ".join(changes) + " |")
    if "recipe" in table:
        lines += ["", f"Every mode trained with `{table['recipe']['recipe']}`; the rendered configs differ only in "
                  + ", ".join(sorted({k for keys in table["recipe"]["differences"].values() for k in keys})) + "."]
    return "\n".join(lines) + "\n"


def _nll(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _with_interval(value: float, interval, number: str) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    low, high = interval
    shown = number.format(value)
    return shown if not (math.isfinite(low) and math.isfinite(high)) else f"{shown} [{number.format(low)}, {number.format(high)}]"


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


