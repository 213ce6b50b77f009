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
    configs/<run>.yml    the rendered recipes       models/      fine-tuned models
    evals/<base|run>/    `curate eval` results      results.json, results.md: the table
    validation/<run>/    target-task gold NLL of each epoch's checkpoint (checkpoint: best-validation-nll)

A run is a mode trained with one seed: with `seeds`, `<mode>-seed<S>`; without, the mode's label.
Runs of one mode with several seeds are aggregated in results.md (mean, spread across seeds,
bootstrap interval of the seed mean).
"""

from __future__ import annotations

import json
import math
import os
import re
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
# The keys in which the rendered recipes of two modes may differ: where the data is, where the model goes,
# and (with `seeds`) the training seed.
DATA_KEYS = ("datasets.0.path", "dataset_prepared_path", "output_dir")
SEED_KEY = "seed"
CHECKPOINT_CHOICES = ("last", "best-validation-nll")


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
    recipe: str = "recipes/axolotl/smollm2-135m-instruct.yml"  # one recipe, for every mode
    model: str = "default"
    train_limit: int | None = None  # the first N training rows
    eval_limit: int | None = None  # the first N rows of each evaluation task
    max_steps: int | None = None  # the recipe's MAX_STEPS
    backend: str = "hf"  # of scoring, generation and evaluation
    max_new_tokens: int = 256  # self-output, rephrase and generation tasks
    on_wrong: str = "drop"  # self-output/rephrase: prompts without a verified answer (drop | ground-truth)
    verify: str = "auto"  # checker of self-output/rephrase answers (auto on multiple-choice rows: choice)
    seed: int = 0  # of the random-mask draw (without `seeds`)
    # Training seeds (the recipe's ${SEED}); each seeded mode trains once per seed. None: one run, the recipe's seed.
    seeds: list[int] | None = None
    seeded_modes: list[str] | None = None  # modes trained with every seed (others: the first); None: all
    epochs: int | None = None  # the recipe's ${EPOCHS}
    # last: evaluate the model as training left it; best-validation-nll: keep each epoch's checkpoint
    # (the recipe saves per epoch) and evaluate the one of lowest gold NLL on the target's validation split.
    checkpoint: str = "last"
    validation_limit: int | None = None  # the first N rows of the target's validation split (epoch choice)
    samples: int = 1  # self-output: answers sampled per prompt (the lowest-perplexity verified one trains)
    temperature: float = 0.0  # self-output sampling (0: greedy); rephrase is one greedy answer
    top_p: float = 1.0
    generation_backend: str | None = None  # self-output/rephrase answers [default: backend]

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
        for name in ("train_limit", "max_steps", "max_new_tokens", "seed", "epochs", "validation_limit", "samples"):
            if raw.get(name) is not None and not _whole(raw[name]):
                raise ExperimentError(f"{path}: {name}: expected a whole number, not {raw[name]!r}")
        limit = raw.get("eval_limit")
        if limit is not None and not _whole(limit) and not (
                isinstance(limit, dict) and all(_whole(v) for v in limit.values())):
            raise ExperimentError(f"{path}: eval_limit: expected a whole number or a mapping task: rows, not {limit!r}")
        if raw.get("seeds") is not None and not (isinstance(raw["seeds"], list) and raw["seeds"]
                                                 and all(_whole(v) for v in raw["seeds"])):
            raise ExperimentError(f"{path}: seeds: expected a list of whole numbers, not {raw['seeds']!r}")
        for name in ("modes", "eval_tasks", "seeded_modes"):
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
        if isinstance(self.eval_limit, dict) and set(self.eval_limit) - set(self.eval_tasks):
            raise ExperimentError(f"{where}: eval_limit: {sorted(set(self.eval_limit) - set(self.eval_tasks))[0]!r} "
                                  "is not among eval_tasks")
        if len(set(self.seeds or [])) != len(self.seeds or []):
            raise ExperimentError(f"{where}: seeds: {self.seeds} names a seed twice")
        if self.seeded_modes is not None:
            known = {m.label for m in self.parsed_modes(where)}
            for spec in self.seeded_modes:
                if Mode.parse(spec, f"{where}: seeded_modes").label not in known:
                    raise ExperimentError(f"{where}: seeded_modes: {spec!r} is not among modes")
        if self.checkpoint not in CHECKPOINT_CHOICES:
            raise ExperimentError(f"{where}: checkpoint: expected one of {', '.join(CHECKPOINT_CHOICES)}, "
                                  f"not {self.checkpoint!r}")
        if self.checkpoint == "best-validation-nll" and "adapter:" in Path(self.recipe).read_text():
            raise ExperimentError(f"{where}: checkpoint: best-validation-nll needs a full fine-tune recipe "
                                  f"({self.recipe} trains a LoRA adapter, whose checkpoints are not whole models)")
        if not 0 < self.top_p <= 1 or self.temperature < 0 or self.samples < 1:
            raise ExperimentError(f"{where}: samples/temperature/top_p: expected samples >= 1, temperature >= 0, "
                                  "0 < top_p <= 1")

    def parsed_modes(self, where: str = "modes") -> list[Mode]:
        return [Mode.parse(spec, where) for spec in self.modes]

    def runs(self) -> list["Run"]:
        """Every (mode, training seed) to train, mode by mode."""
        seeded = None if self.seeded_modes is None else {Mode.parse(s, "seeded_modes").label for s in self.seeded_modes}
        out = []
        for mode in self.parsed_modes():
            seeds = list(self.seeds) if self.seeds else [None]
            out += [Run(mode, seed) for seed in (seeds if seeded is None or mode.label in seeded else seeds[:1])]
        return out

    def eval_rows(self, task: str) -> int | None:
        return self.eval_limit.get(task) if isinstance(self.eval_limit, dict) else self.eval_limit


@dataclass(frozen=True)
class Run:
    """One mode trained with one seed (None: the recipe's own seed, and the mode's label)."""

    mode: Mode
    seed: int | None = None

    @property
    def label(self) -> str:
        return self.mode.label if self.seed is None else f"{self.mode.label}-seed{self.seed}"

    @property
    def export_label(self) -> str:
        """Random masking draws anew per seed; the other modes' training sets do not depend on it."""
        return self.label if self.mode.name == "random-mask" else self.mode.label


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    modes, runs = config.parsed_modes(), config.runs()
    data_options = {k: getattr(config, k) for k in ("train", "train_limit", "eval_tasks")}
    if isinstance(config.eval_limit, dict):  # the limited copies are written by the data step
        data_options["eval_limit"] = config.eval_limit
    steps.run("data", data_options, lambda: prepare_data(config, output / "data"))
    train, held_out = output / "data" / "train.jsonl", json.loads((output / "data" / "eval.json").read_text())
    scored = output / "scored"
    steps.run("score", {"model": str(model_dir), "backend": config.backend}, lambda: run_command(
        curate_command("score", train, "-o", scored, "--model", model_dir, "--backend", config.backend, "--overwrite",
                       "--quiet"), output / "logs" / "score.log"))

    exported = set()
    for run in runs:
        if run.export_label not in exported:
            _export_mode(run, modes, config, model_dir, output, steps)
            exported.add(run.export_label)
    reference = None
    for run in runs:
        reference = _finetune_mode(run, config, model_dir, output, steps, axolotl, reference)
        if config.checkpoint == "best-validation-nll":
            steps.run(f"choose/{run.label}", {"validation_limit": config.validation_limit, "backend": VALIDATION_BACKEND},
                      lambda run=run: choose_checkpoint(config, output, run.label))

    tasks = ",".join(f"{task}={held_out[task]}" if task in held_out else task for task in config.eval_tasks)
    limit = config.eval_limit if not isinstance(config.eval_limit, dict) else None
    eval_options = {"tasks": tasks, "limit": limit, "backend": config.backend, "max_new_tokens": config.max_new_tokens}
    for label, model in [("base", model_dir), *((r.label, trained_model(output, r.label)) for r in runs)]:
        command = curate_command("eval", model, "--tasks", tasks, "-o", output / "evals" / label, "--backend",
                                 config.backend, "--max-new-tokens", config.max_new_tokens,
                                 *(["--limit", limit] if limit else []))
        steps.run(f"eval/{label}", {**eval_options, "model": str(model)},
                  lambda command=command, label=label: run_command(command, output / "logs" / f"eval-{label}.log"))
    table = build_table(output, config.target, runs, diagnostics=masked_by_mode(output, runs, model_dir))
    table["recipe"] = recipe_check(config.recipe, output, [r.label for r in runs])
    table["config"] = {"seeds": config.seeds, "checkpoint": config.checkpoint, "epochs": config.epochs}
    write_table(table, output)
    (output / CONFIG).write_text(json.dumps(asdict(config), indent=1) + "\n")
    log(f"wrote {output / TABLE_MD} and {output / TABLE_JSON}")
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


def arms_of(runs: list[Run]) -> dict[str, list[str]]:
    """mode label -> the labels of its runs (one per seed)."""
    arms: dict[str, list[str]] = {}
    for run in runs:
        arms.setdefault(run.mode.label, []).append(run.label)
    return arms


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
    if isinstance(config.eval_limit, dict):
        for task in config.eval_tasks:
            source = Path(held_out[task]) if task in held_out else pull([task])[task] / "test.jsonl"
            task_rows = _read_jsonl(source)
            limit = config.eval_limit.get(task)
            write_jsonl(folder / f"{task}.jsonl", task_rows[:limit] if limit else task_rows)
            held_out[task] = str(folder / f"{task}.jsonl")
    (folder / "eval.json").write_text(json.dumps(held_out, indent=1) + "\n")


def _export_mode(run: Run, modes: list[Mode], config: ExperimentConfig, model_dir: Path, output: Path,
                 steps: Steps) -> None:
    """exports/<mode>.parquet; self-output and rephrase first answer, then score their answers."""
    mode = run.mode
    scored, target = output / "scored", export_path(output, run.export_label)
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
        seed = config.seed if run.seed is None else run.seed
        options |= {"ratio": ratio, "seed": seed, "as_masked_as": stm.label}
        args += ["--mode", "random-mask", "--mask-ratio", repr(ratio), "--seed", seed]
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
            backend, "--verify", verify, "--max-new-tokens", config.max_new_tokens, "--overwrite", "--quiet",
            *sampling, *(["--rephrase"] if mode.name == "rephrase" else [])), logs / f"generate-{mode.name}.log"))
        steps.run(f"score/{mode.name}", {k: v for k, v in answer.items() if k != "backend"} | {"backend": config.backend},
                  lambda: run_command(curate_command(
                      "score", generated, "-o", generated_scored, "--model", model_dir, "--backend", config.backend,
                      "--overwrite", "--quiet"), logs / f"score-{mode.name}.log"))
        scored = generated_scored
        options |= {"on_wrong": config.on_wrong}
        args += ["--mode", "self-output", "--on-wrong", config.on_wrong,
                 *(["--ground-truth", output / "scored"] if config.on_wrong == "ground-truth" else [])]
    steps.run(f"export/{run.export_label}", options, lambda: run_command(
        curate_command("export", scored, "-o", target, *args), logs / f"export-{run.export_label}.log"))


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
    run_command(curate_command("check-recipe", config.recipe, "--data", data, "-o", config_path,
                               *(arg for name, value in variables.items() for arg in ("--var", f"{name}={value}"))),
                output / "logs" / f"check-recipe-{label}.log")
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
    env = {"PATH": f"{Path(axolotl).parent}{os.pathsep}{os.environ.get('PATH', '')}"} if os.sep in axolotl else {}
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


CHOICE = "checkpoint.json"  # models/<run>/checkpoint.json: each epoch's validation gold NLL and the chosen one
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
    (run_dir / CHOICE).write_text(json.dumps(choice, indent=1) + "\n")
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


def export_path(output: Path, label: str) -> Path:
    return output / "exports" / f"{label}.parquet"


def trained_model(output: Path, label: str) -> Path:
    """The directory `curate eval` loads: the chosen epoch's checkpoint (checkpoint: best-validation-nll),
    the merged model for a LoRA recipe, else Axolotl's output."""
    run_dir = output / "models" / label
    if (run_dir / CHOICE).exists():
        return run_dir / json.loads((run_dir / CHOICE).read_text())["chosen"]
    return run_dir / "merged" if (run_dir / "merged").is_dir() else run_dir


# ---------------------------------------------------------------- the table


def build_table(output: Path, target: str, runs: list[Run], diagnostics: dict | None = None) -> dict:
    """Scores of the base model and of each run, and per run TI, BWT and the absolute change of
    every task, each with its 95% interval (`curate.evaluate.forgetting`), on the task score and on
    gold-answer NLL; per mode with several seeds, the aggregate (`seed_aggregate`); each step's time."""
    output = Path(output)
    base_dir = output / "evals" / "base"
    labels = [run.label for run in runs]
    scores = {label: _scores(output / "evals" / label) for label in ["base", *labels]}
    modes = {}
    for run in runs:
        label = run.label
        result = forgetting(base_dir, output / "evals" / label, target)
        nll = forgetting(base_dir, output / "evals" / label, target, metric="gold_nll")
        stats = json.loads(export_path(output, run.export_label).with_suffix(".stats.json").read_text())
        modes[label] = {"mode": run.mode.label, "seed": run.seed,
                        "ti": result.ti, "ti_interval": result.ti_interval, "bwt": result.bwt,
                        "bwt_interval": result.bwt_interval,
                        "absolute": {task: {"change": change, "interval": interval}
                                     for task, (change, interval) in result.absolute.items()},
                        "ti_nll": nll.ti, "ti_nll_interval": nll.ti_interval, "bwt_nll": nll.bwt,
                        "bwt_nll_interval": nll.bwt_interval,
                        "nll_change": {task: {"change": change, "interval": interval}
                                       for task, (change, interval) in nll.absolute.items()},
                        "examples": stats["examples_out"], "trained_tokens": stats["trained_tokens"],
                        "masked_ratio": stats["masked_ratio"],
                        "prompts": {key: stats.get(key) for key in ("self_output_prompts", "ground_truth_fallbacks",
                                                                    "prompts_dropped")},
                        "examples_in": stats["examples_in"],
                        "final_loss": _final_loss(output / "models" / label),
                        "checkpoint": _checkpoint_choice(output / "models" / label)}
    tasks = list(scores["base"])
    table = {"target": target, "tasks": tasks, "scores": scores, "modes": modes, "times": step_times(output)}
    arms = arms_of(runs)
    if any(len(members) > 1 for members in arms.values()):
        table["arms"] = {arm: seed_aggregate(output, target, members, modes) for arm, members in arms.items()}
    if diagnostics:
        table["diagnostics"] = diagnostics
    return table


METRICS = ("ti", "bwt", "ti_nll", "bwt_nll")


def seed_aggregate(output: Path, target: str, labels: list[str], modes: dict) -> dict:
    """One mode over its seeds: per metric the mean over seeds, their sample standard deviation
    (the spread; None for one seed), each seed's value, and the 95% paired bootstrap interval over
    examples of the seed mean (each example's value averaged over the seeds first)."""
    output = Path(output)
    base, tuned = output / "evals" / "base", [output / "evals" / label for label in labels]
    by_metric = {"correct": forgetting(base, tuned, target), "gold_nll": forgetting(base, tuned, target, metric="gold_nll")}
    out: dict = {"runs": labels, "seeds": [modes[label]["seed"] for label in labels]}
    for metric in METRICS:
        result = by_metric["gold_nll" if metric.endswith("_nll") else "correct"]
        name = metric.removesuffix("_nll")
        values = [modes[label][metric] for label in labels]
        out[metric] = {"mean": getattr(result, name), "sd": _sd(values), "interval": getattr(result, f"{name}_interval"),
                       "per_seed": values}
    for key, metric in (("absolute", "correct"), ("nll_change", "gold_nll")):
        out[key] = {task: {"mean": change, "interval": interval,
                           "sd": _sd([modes[label][key][task]["change"] for label in labels]),
                           "per_seed": [modes[label][key][task]["change"] for label in labels]}
                    for task, (change, interval) in by_metric[metric].absolute.items()}
    return out


def _sd(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2:
        return None
    mean = sum(finite) / len(finite)
    return math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def step_times(output: Path) -> dict[str, float]:
    """Seconds each finished step took, in the order the steps finished (their markers)."""
    markers = sorted((Path(output) / "steps").glob("*.json"), key=lambda path: path.stat().st_mtime)
    times = {}
    for marker in markers:
        done = json.loads(marker.read_text())
        times[done["step"]] = done.get("seconds")
    return times


def _checkpoint_choice(run_dir: Path) -> dict | None:
    if not (run_dir / CHOICE).exists():
        return None
    choice = json.loads((run_dir / CHOICE).read_text())
    return {"chosen": choice["chosen"], "epoch": choice["checkpoints"][choice["chosen"]]["epoch"],
            "validation_gold_nll": {name: c["gold_nll"] for name, c in choice["checkpoints"].items()}}


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
    modes = table["modes"]
    if any("ti_nll" in row for row in modes.values()):
        lines += ["", "Gold-answer NLL: TI and BWT as relative changes (negative: the gold answers became likelier), "
                  "and each task's change:", "",
                  f"| run | TI NLL ({target}) | BWT NLL | " + " | ".join(f"Δ NLL {t}" for t in tasks) + " |",
                  "|---|---|---|" + "---|" * len(tasks)]
        for label, row in modes.items():
            changes = [_with_interval(row["nll_change"][t]["change"], row["nll_change"][t]["interval"], "{:+.3f}")
                       for t in tasks]
            lines.append(f"| {label} | {_with_interval(row['ti_nll'], row['ti_nll_interval'], '{:+.1%}')} | "
                         f"{_with_interval(row['bwt_nll'], row['bwt_nll_interval'], '{:+.1%}')} | "
                         + " | ".join(changes) + " |")
    if table.get("arms"):
        lines += ["", "Over seeds: the mean over seeds, the spread (sample standard deviation across seeds, "
                  "each seed's value after it), and the 95% bootstrap interval of the mean over examples:", "",
                  "| mode | seeds | metric | mean | spread across seeds (sd) | per seed | 95% bootstrap interval |",
                  "|---|---|---|---|---|---|---|"]
        names = {"ti": f"TI ({target})", "bwt": "BWT", "ti_nll": f"TI NLL ({target})", "bwt_nll": "BWT NLL"}
        for arm, row in table["arms"].items():
            for metric, name in names.items():
                cell = row[metric]
                lines.append(f"| {arm} | {len(row['runs'])} | {name} | {_percent(cell['mean'])} | "
                             f"{_percent(cell['sd'], sign=False)} | {', '.join(_percent(v) for v in cell['per_seed'])} | "
                             f"{_interval(cell['interval'], _percent)} |")
            for task in tasks:
                cell = row["absolute"][task]
                spread = "n/a" if cell["sd"] is None else f"{cell['sd']:.3f}"
                lines.append(f"| {arm} | {len(row['runs'])} | Δ {task} | {cell['mean']:+.3f} | {spread} | "
                             f"{', '.join(f'{v:+.3f}' for v in cell['per_seed'])} | "
                             f"{_interval(cell['interval'], lambda v: f'{v:+.3f}')} |")
    prompts = {label: row for label, row in modes.items() if row.get("prompts", {}).get("self_output_prompts") is not None}
    if prompts:
        lines += ["", "| run | prompts | trained on the model's own answer | fell back to the ground truth | dropped |",
                  "|---|---|---|---|---|"]
        for label, row in prompts.items():
            counts = row["prompts"]
            total = counts["self_output_prompts"] + (counts["ground_truth_fallbacks"] or 0) + (counts["prompts_dropped"] or 0)
            lines.append(f"| {label} | {total} | {counts['self_output_prompts']} | {counts['ground_truth_fallbacks'] or 0} | "
                         f"{counts['prompts_dropped'] or 0} |")
    chosen = {label: row["checkpoint"] for label, row in modes.items() if row.get("checkpoint")}
    if chosen:
        lines += ["", "Checkpoint evaluated (lowest gold NLL on the target's validation split, per epoch):", "",
                  "| run | chosen | epoch | validation gold NLL per checkpoint |", "|---|---|---|---|"]
        for label, choice in chosen.items():
            per = ", ".join(f"{name}: {value:.3f}" for name, value in choice["validation_gold_nll"].items())
            epoch = "n/a" if choice["epoch"] is None else f"{choice['epoch']:g}"
            lines.append(f"| {label} | {choice['chosen']} | {epoch} | {per} |")
    if table.get("diagnostics"):
        lines += ["", diagnostics_markdown(table["diagnostics"])]
    if "recipe" in table:
        lines += ["", f"Every mode trained with `{table['recipe']['recipe']}`; the rendered configs differ only in "
                  + ", ".join(sorted({k for keys in table["recipe"]["differences"].values() for k in keys})) + "."]
    if table.get("times"):
        total = sum(v for v in table["times"].values() if v)
        lines += ["", f"Step times ({total / 60:.1f} minutes in all, as each step last ran; a resumed run "
                  "keeps the times of the steps it skipped):", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {step} | {seconds:.0f} |" for step, seconds in table["times"].items() if seconds is not None]
    return "\n".join(lines) + "\n"


def _percent(value: float | None, sign: bool = True) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.1%}" if sign else f"{value:.1%}"


def _interval(interval, number: Callable[[float], str]) -> str:
    low, high = interval
    return f"[{number(low)}, {number(high)}]" if math.isfinite(low) and math.isfinite(high) else "n/a"


def _nll(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _with_interval(value: float, interval, number: str) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    low, high = interval
    shown = number.format(value)
    return shown if not (math.isfinite(low) and math.isfinite(high)) else f"{shown} [{number.format(low)}, {number.format(high)}]"


# ---------------------------------------------------------------- what STM masked


CATEGORIES = ("number", "calculator", "formatting", "word")
_ANNOTATION = re.compile(r"<<[^>]*>>")


def token_categories(texts: list[str]) -> list[str]:
    """The kind of each token of one answer, from the tokens' texts in order: `calculator` inside a
    GSM8K calculator annotation `<<48/2=24>>` (its brackets included), `number` (a digit outside
    one), `formatting` (only whitespace, punctuation or symbols: newlines, `.`, `$`, `**`), else `word`."""
    text = "".join(texts)
    spans = [match.span() for match in _ANNOTATION.finditer(text)]
    out, start = [], 0
    for piece in texts:
        end = start + len(piece)
        if piece and any(a < end and start < b for a, b in spans):
            out.append("calculator")
        elif any(c.isdigit() for c in piece):
            out.append("number")
        elif not any(c.isalnum() for c in piece):
            out.append("formatting")
        else:
            out.append("word")
        start = end
    return out


def mask_diagnostics(scored_dir: Path, export_file: Path, tokenizer, top: int = 15) -> dict:
    """Which target tokens a training set masked (labels -100 on a target token of the scored set,
    matched by id): how many, the share of masked tokens of each kind (`token_categories`) beside
    that kind's share of all target tokens, the share of each kind that was masked, and the most
    often masked tokens (with how often each of them is masked where it occurs)."""
    import pyarrow.parquet as pq
    from collections import Counter

    from curate.store import open_scored

    labels = {}
    for record in pq.read_table(export_file, columns=["id", "labels"]).to_pylist():
        labels.setdefault(record["id"], record["labels"])
    texts: dict[int, str] = {}
    kinds, masked_kinds, masked_text, seen_text = Counter(), Counter(), Counter(), Counter()
    for shard in open_scored(scored_dir)[1]:
        for record in pq.read_table(shard, columns=["id", "input_ids", "target"]).to_pylist():
            if record["id"] not in labels:
                continue
            row_labels, ids = labels.pop(record["id"]), record["input_ids"]
            positions = [i for i, is_target in enumerate(record["target"]) if is_target]
            for i in positions:
                if ids[i] not in texts:
                    texts[ids[i]] = tokenizer.decode([ids[i]])
            pieces = [texts[ids[i]] for i in positions]
            for i, piece, kind in zip(positions, pieces, token_categories(pieces)):
                kinds[kind] += 1
                seen_text[piece] += 1
                if row_labels[i] == -100:
                    masked_kinds[kind] += 1
                    masked_text[piece] += 1
    target, masked = sum(kinds.values()), sum(masked_kinds.values())
    return {"target_tokens": target, "masked_tokens": masked,
            "masked_share": {k: masked_kinds[k] / masked if masked else 0.0 for k in CATEGORIES},
            "target_share": {k: kinds[k] / target if target else 0.0 for k in CATEGORIES},
            "masked_rate": {k: masked_kinds[k] / kinds[k] if kinds[k] else 0.0 for k in CATEGORIES},
            "top": [{"token": piece, "masked": count, "rate": count / seen_text[piece]}
                    for piece, count in masked_text.most_common(top)]}


def diagnostics_markdown(diagnostics: dict) -> str:
    lines = ["What each masking run masked on the training set: the share of masked tokens of each kind "
             "(beside that kind's share of all target tokens), and the tokens masked most often "
             "(with the share of their occurrences masked):", "",
             "| training set | masked | " + " | ".join(CATEGORIES) + " | most often masked |",
             "|---|---|" + "---|" * len(CATEGORIES) + "---|"]
    for label, found in diagnostics.items():
        shares = [f"{found['masked_share'][k]:.0%} ({found['target_share'][k]:.0%})" for k in CATEGORIES]
        common = ", ".join(f"`{_shown(item['token'])}` {item['masked']} ({item['rate']:.0%})" for item in found["top"][:8])
        lines.append(f"| {label} | {found['masked_tokens']:,} of {found['target_tokens']:,} | " + " | ".join(shares)
                     + f" | {common} |")
    return "\n".join(lines)


def _shown(piece: str) -> str:
    return piece.replace("\n", "\\n").replace("|", "\\|").replace("`", "'") or "(empty)"


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


