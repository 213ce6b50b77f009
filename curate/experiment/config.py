"""The experiment's config: a typed model (an unknown or mistyped field is refused, naming the
file and the field), the modes it trains and the runs (mode x seed) they make."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from curate.errors import CurateError
from curate.masking import DEFAULT_THRESHOLD
from curate.settings import SETTINGS

CONFIG = "experiment.json"  # the config as run, in the output directory: marks it as an experiment's
MODE_NAMES = ("ground-truth", "stm", "random-mask", "self-output", "rephrase")
CHECKPOINT_CHOICES = ("last", "best-validation-nll")
CHECKERS = ("auto", "none", "math", "exact", "code", "choice")


class ExperimentError(CurateError):
    """A config or a resume the user can fix: the message names the file and the field."""


@dataclass(frozen=True)
class Mode:
    """One way of building the training set. `stm` takes `tau` (default: the paper's τ) or `ratio`;
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
    def parse(cls, spec: str, where: str) -> Mode:
        """`ground-truth`, `stm`, `stm:tau=2`, `stm:ratio=0.2`, `random-mask`, `self-output`, `rephrase`."""
        name, _, setting = str(spec).partition(":")
        if name not in MODE_NAMES:
            raise ExperimentError(f"{where}: unknown mode {spec!r} (expected one of {', '.join(MODE_NAMES)})")
        if not setting:
            return cls(name, tau=DEFAULT_THRESHOLD if name == "stm" else None)
        key, _, value = setting.partition("=")
        if name != "stm" or key not in ("tau", "ratio"):
            raise ExperimentError(f"{where}: {spec!r}: only stm takes a setting, tau=T or ratio=R")
        try:
            return cls(name, **{key: float(value)})
        except ValueError:
            raise ExperimentError(f"{where}: {spec!r}: {key} must be a number") from None


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


Count = Annotated[int, Field(strict=True, ge=1)]  # a whole number of rows, steps, samples
Backend = Literal[SETTINGS["backend"].choices]  # the command line's --backend
OnWrong = Literal[SETTINGS["on_wrong"].choices]  # export's --on-wrong


class ExperimentConfig(BaseModel):
    """What `curate experiment` runs (a YAML or JSON file with these fields)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    train: str  # a benchmark task (`curate benchmarks list`) or a training file
    target: str  # the task trained for: its change is TI
    eval_tasks: list[str]  # every task evaluated, the target among them; the others make BWT
    modes: list[str] = ["ground-truth", "stm", "random-mask", "self-output"]
    recipe: str = "recipes/axolotl/smollm2-135m-instruct.yml"  # one recipe, for every mode
    model: str = "default"
    train_limit: Count | None = None  # the first N training rows
    eval_limit: Count | dict[str, Count] | None = None  # the first N rows of each evaluated task (or per task)
    max_steps: Count | None = None  # the recipe's MAX_STEPS
    backend: Backend = "hf"  # of scoring, generation and evaluation
    max_new_tokens: Count = 256  # self-output, rephrase and generation tasks
    on_wrong: OnWrong = "drop"  # self-output/rephrase: prompts without a verified answer
    verify: Literal[CHECKERS] = "auto"  # checker of self-output/rephrase answers (auto on multiple-choice rows: choice)
    seed: Annotated[int, Field(strict=True)] = 0  # of the random-mask draw (without `seeds`) and of self-output sampling
    # Training seeds (the recipe's ${SEED}); each seeded mode trains once per seed. None: one run, the recipe's seed.
    seeds: Annotated[list[Annotated[int, Field(strict=True)]], Field(min_length=1)] | None = None
    seeded_modes: list[str] | None = None  # modes trained with every seed (others: the first); None: all
    epochs: Count | None = None  # the recipe's ${EPOCHS}
    # last: evaluate the model as training left it; best-validation-nll: keep each epoch's checkpoint
    # (the recipe saves per epoch) and evaluate the one of lowest gold NLL on the target's validation split.
    checkpoint: Literal[CHECKPOINT_CHOICES] = "last"
    validation_limit: Count | None = None  # the first N rows of the target's validation split (epoch choice)
    samples: Count = 1  # self-output: answers sampled per prompt (the lowest-perplexity verified one trains)
    temperature: float = Field(0.0, ge=0)  # self-output sampling (0: greedy); rephrase is one greedy answer
    top_p: float = Field(1.0, gt=0, le=1)
    generation_backend: Backend | None = None  # self-output/rephrase answers [default: backend]

    @field_validator("eval_tasks", "modes", "seeded_modes", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [item for item in value.split(",") if item] if isinstance(value, str) else value

    @classmethod
    def load(cls, path: Path) -> ExperimentConfig:
        import yaml

        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
        except (OSError, yaml.YAMLError) as error:
            raise ExperimentError(f"{path}: cannot read it as YAML or JSON: {error}") from None
        if not isinstance(raw, dict):
            raise ExperimentError(f"{path}: expected a mapping of fields ({', '.join(cls.model_fields)})")
        try:
            config = cls(**raw)
        except ValidationError as error:
            raise ExperimentError(f"{path}: {_first_problem(error)}") from None
        config.check(str(path))
        return config

    def check(self, where: str) -> None:
        """What the types cannot say: the tasks exist, the modes make sense together, the recipe fits."""
        from curate.benchmarks import TASKS

        for task in [*self.eval_tasks, self.target]:
            if task not in TASKS:
                raise ExperimentError(f"{where}: eval_tasks/target: unknown task {task!r} (known: {', '.join(TASKS)})")
        if self.target not in self.eval_tasks:
            raise ExperimentError(f"{where}: eval_tasks must include the target {self.target!r}")
        if self.train not in TASKS and not Path(self.train).is_file():
            raise ExperimentError(f"{where}: train: {self.train!r} is neither a benchmark task nor a file")
        if not self.modes:
            raise ExperimentError(f"{where}: modes: name at least one")
        modes = self.parsed_modes(f"{where}: modes")
        labels = [m.label for m in modes]
        if len(set(labels)) != len(labels):
            raise ExperimentError(f"{where}: modes: {labels} names a mode twice")
        if any(m.name == "random-mask" for m in modes) and not any(m.name == "stm" for m in modes):
            raise ExperimentError(f"{where}: modes: random-mask masks as many tokens as STM did, so it needs an stm mode")
        if not Path(self.recipe).is_file():
            raise ExperimentError(f"{where}: recipe: no such file {self.recipe}")
        if isinstance(self.eval_limit, dict) and set(self.eval_limit) - set(self.eval_tasks):
            raise ExperimentError(f"{where}: eval_limit: {sorted(set(self.eval_limit) - set(self.eval_tasks))[0]!r} "
                                  "is not among eval_tasks")
        if len(set(self.seeds or [])) != len(self.seeds or []):
            raise ExperimentError(f"{where}: seeds: {self.seeds} names a seed twice")
        for spec in self.seeded_modes or []:
            if Mode.parse(spec, f"{where}: seeded_modes").label not in labels:
                raise ExperimentError(f"{where}: seeded_modes: {spec!r} is not among modes")
        if self.checkpoint == "best-validation-nll" and "adapter:" in Path(self.recipe).read_text():
            raise ExperimentError(f"{where}: checkpoint: best-validation-nll needs a full fine-tune recipe "
                                  f"({self.recipe} trains a LoRA adapter, whose checkpoints are not whole models)")

    def parsed_modes(self, where: str = "modes") -> list[Mode]:
        return [Mode.parse(spec, where) for spec in self.modes]

    def runs(self) -> list[Run]:
        """Every (mode, training seed) to train, seed by seed: every mode's first seed comes first, so
        that a run stopped part way (the full config takes hours on CPUs) already compares every arm."""
        seeded = None if self.seeded_modes is None else {Mode.parse(s, "seeded_modes").label for s in self.seeded_modes}
        seeds = list(self.seeds) if self.seeds else [None]
        return [Run(mode, seed) for index, seed in enumerate(seeds) for mode in self.parsed_modes()
                if index == 0 or seeded is None or mode.label in seeded]

    def eval_rows(self, task: str) -> int | None:
        return self.eval_limit.get(task) if isinstance(self.eval_limit, dict) else self.eval_limit


def _first_problem(error: ValidationError) -> str:
    """pydantic's first complaint, in the config's words: the field, then what is wrong with it."""
    def path(problem) -> list[str]:  # the field's path, without pydantic's tags of union members ("constrained-int")
        return [str(part) for part in problem["loc"] if not (isinstance(part, str) and ("[" in part or "-" in part))]

    problem = max(error.errors(), key=lambda problem: len(path(problem)))  # the deepest: where the value went wrong
    field = ".".join(path(problem))
    if problem["type"] == "extra_forbidden":
        return f"unknown field {field!r} (known: {', '.join(ExperimentConfig.model_fields)})"
    if problem["type"] == "missing":
        return f"the field {field!r} is required"
    return f"{field}: {problem['msg'].lower()} (given: {problem.get('input')!r})"
