"""`curate eval`: score a model on benchmark tasks the way the study did, with intervals.

Generation tasks (GSM8K, MBPP, HumanEval, MATH) are answered greedily, one answer per prompt,
by `generate_dataset` and checked by curate's own checkers (code in the sandbox, math by the
final number). Multiple-choice tasks (ARC, PIQA, HellaSwag, ...) take the option whose
answer tokens have the highest log-likelihood under the model (`acc`), and per byte of the
option (`acc_norm`). Every task also reports the NLL of its gold answers (`gold_nll`): cheap,
and it moves with forgetting even where a small model's accuracy is near zero.

Each score comes with a 95% bootstrap interval over examples; `forgetting` turns a base and
a fine-tuned evaluation into the study's TI (relative change on the target task) and BWT
(mean relative change on the others), with paired bootstrap intervals.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.files import write_atomic
from curate.settings import SETTINGS
from curate.tokenize import ChatTokenizer

BOOTSTRAP_SAMPLES = 1000
RESULTS = "results.json"


@dataclass
class TaskScore:
    task: str
    kind: str  # "generation" or "multiple_choice"
    metric: str  # what `score` is: pass@1 / exact final answer / acc
    examples: int  # examples scored (unchecked generation answers are not counted)
    score: float
    interval: tuple[float, float]  # 95% bootstrap interval of `score`
    acc_norm: float | None = None  # multiple choice: accuracy by log-likelihood per byte of the option
    gold_nll: float | None = None  # mean NLL per gold-answer token: lower is better
    unchecked: int = 0  # generation answers no checker could decide
    rejected: int = 0  # rows the evaluation could not use (their reasons: <task>.choices|.gold/rejects.jsonl)


@dataclass
class EvalSummary:
    model: str
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    output: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def bootstrap_interval(values: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of `values`, resampling examples."""
    if values.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    return (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


def task_file(name: str, split: str = "test") -> Path:
    """A pulled task's split file (pulled now if it is not cached yet)."""
    from curate.benchmarks import pull

    path = pull([name])[name] / f"{split}.jsonl"
    if not path.exists():
        splits = sorted(p.stem for p in path.parent.glob("*.jsonl"))
        raise ValueError(f"{name} has no {split!r} split (it has: {', '.join(splits)})")
    return path


def evaluate(model_dir: Path, tasks: dict[str, Path], output_dir: Path, engine, chat_tokenizer: ChatTokenizer,
             limit: int | None = None, max_new_tokens: int = SETTINGS["max_new_tokens"].default,
             unsafe_verify: bool = False, gold_nll_only: bool = False, shard_rows: int | None = None) -> EvalSummary:
    """Evaluate the model in `model_dir` on each task file (`curate benchmarks pull` output), with
    `engine`: an engine in this process, or an executor (`RayExecutor`). Each task runs as a
    resumable pipeline into `output_dir/<task>.choices|.gold|.generated/`; per-example results
    go to `output_dir/<task>.parquet`, the summary to `results.json`.
    `gold_nll_only`: only the gold answers' NLL (no generation, no options; the score is the NLL).
    `shard_rows`: rows per shard, the unit of resume (None: `eval_steps.SHARD_ROWS`, and generate's own)."""
    from curate.benchmarks import TASKS
    from curate.eval_steps import ChoiceStep, GoldNLLStep, run_scoring_step
    from curate.executors import as_executor

    executor = as_executor(engine)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = EvalSummary(model=str(model_dir), output=str(output_dir))
    for name, path in tasks.items():
        source = _limited(path, output_dir / f"{name}.input.jsonl", limit)

        def scored(step, suffix, name=name, source=source):
            return run_scoring_step(step, source, output_dir / f"{name}.{suffix}", executor, model_dir, chat_tokenizer,
                                    shard_rows)

        if gold_nll_only:
            gold, rejected = scored(GoldNLLStep(chat_tokenizer), "gold")
            pq.write_table(gold.select(["id", "gold_nll"]), output_dir / f"{name}.parquet")
            values = _finite(gold.column("gold_nll").to_numpy())
            summary.tasks[name] = TaskScore(task=name, kind=TASKS[name].kind, metric="gold NLL", examples=int(values.size),
                                            score=float(values.mean()) if values.size else math.nan,
                                            interval=bootstrap_interval(values), rejected=rejected,
                                            gold_nll=float(values.mean()) if values.size else None)
            continue
        if TASKS[name].kind == "multiple_choice":  # the gold answer's NLL comes out of the same pass
            rows, rejected = scored(ChoiceStep(chat_tokenizer), "choices")
            table, score = _multiple_choice(rows, name)
        else:
            rows, rejected = scored(GoldNLLStep(chat_tokenizer), "gold")
            table, score = _generation(source, output_dir / f"{name}.generated", executor, chat_tokenizer, name,
                                       TASKS[name].checker, max_new_tokens, unsafe_verify, shard_rows)
        gold_nll = dict(zip(rows.column("id").to_pylist(), rows.column("gold_nll").to_pylist()))
        ids = table.column("id").to_pylist()
        table = table.append_column("gold_nll", pa.array([gold_nll.get(i) for i in ids], pa.float64()))
        pq.write_table(table, output_dir / f"{name}.parquet")
        values = _finite(np.array(list(gold_nll.values()), dtype=float))
        score.gold_nll = float(values.mean()) if values.size else None
        score.rejected = rejected
        summary.tasks[name] = score
    write_atomic(output_dir / RESULTS, (summary.to_json() + "\n").encode())
    return summary


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _limited(path: Path, copy: Path, limit: int | None) -> Path:
    """The first `limit` rows of a task file (a copy, so the generation run can resume on it)."""
    if limit is None:
        return Path(path)
    with open(path, encoding="utf-8") as source:
        lines = [line for _, line in zip(range(limit), source)]
    if not copy.exists() or copy.read_text(encoding="utf-8") != "".join(lines):
        copy.write_text("".join(lines), encoding="utf-8")
    return copy


def _generation(source: Path, generated: Path, engine, chat_tokenizer: ChatTokenizer, name: str, checker: str,
                max_new_tokens: int, unsafe_verify: bool, shard_rows: int | None) -> tuple[pa.Table, TaskScore]:
    """Greedy answers checked by the task's checker; resumable (the generated directory)."""
    import polars as pl

    from curate.engines.base import SamplingOptions
    from curate.generate import generate_dataset
    from curate.pipeline import RunOptions
    from curate.store import read_manifest

    # Resuming a finished run only checks that its options (the model among them) are these.
    generate_dataset(source, generated, engine, chat_tokenizer, SamplingOptions(max_new_tokens=max_new_tokens),
                     checker=checker, run=RunOptions(resume=(generated / "manifest.json").exists(), shard_rows=shard_rows),
                     unsafe_verify=unsafe_verify)

    answers = pl.read_parquet([str(generated / s["file"]) for s in read_manifest(generated).shards],
                              columns=["id", "verified", "verify_reason", "finished", "n_tokens"])
    decided = answers.filter(pl.col("verified").is_not_null())
    correct = decided["verified"].cast(pl.Float64).to_numpy()
    table = pa.Table.from_pydict({"id": answers["id"].to_list(), "correct": answers["verified"].to_list(),
                                  "reason": answers["verify_reason"].to_list(), "finished": answers["finished"].to_list()})
    metric = "pass@1" if checker == "code" else "exact final answer"
    return table, TaskScore(task=name, kind="generation", metric=metric, examples=decided.height,
                            score=float(correct.mean()) if correct.size else math.nan,
                            interval=bootstrap_interval(correct), unchecked=answers.height - decided.height)


def _multiple_choice(choices: pa.Table, name: str) -> tuple[pa.Table, TaskScore]:
    """Accuracy: the option of highest log-likelihood (`acc`), and of highest log-likelihood per
    byte of the option (`acc_norm`), from `ChoiceStep`'s per-row results."""
    ids, gold = choices.column("id").to_pylist(), choices.column("gold").to_pylist()
    logliks, sizes = choices.column("loglik").to_pylist(), choices.column("option_bytes").to_pylist()
    predicted = [int(np.argmax(ll)) for ll in logliks]
    predicted_norm = [int(np.argmax([v / max(1, size) for v, size in zip(ll, row_sizes)]))
                      for ll, row_sizes in zip(logliks, sizes)]
    correct = np.array(predicted) == np.array(gold)
    correct_norm = np.array(predicted_norm) == np.array(gold)
    table = pa.Table.from_pydict({"id": ids, "correct": correct.tolist(), "correct_norm": correct_norm.tolist(),
                                  "gold": gold, "predicted": predicted, "loglik": logliks})
    return table, TaskScore(task=name, kind="multiple_choice", metric="acc", examples=len(ids),
                            score=float(correct.mean()) if ids else math.nan,
                            interval=bootstrap_interval(correct.astype(float)),
                            acc_norm=float(correct_norm.mean()) if ids else None)


# ---------------------------------------------------------------- forgetting


@dataclass
class Forgetting:
    target: str
    ti: float  # relative change on the target task
    ti_interval: tuple[float, float]
    bwt: float  # mean relative change on the other tasks
    bwt_interval: tuple[float, float]
    absolute: dict[str, tuple[float, tuple[float, float]]]  # task -> (tuned - base, 95% interval)


def forgetting(base_dir: Path, tuned_dir: Path | list[Path], target: str, samples: int = BOOTSTRAP_SAMPLES,
               seed: int = 0, metric: str = "correct") -> Forgetting:
    """TI and BWT as the study computes them, from two `curate eval` result directories that
    evaluated the same examples. Intervals: a paired bootstrap over each task's examples
    (the same resampled examples for base and fine-tuned).

    Several `tuned_dir`s (one fine-tuning per seed): each example's value is its mean over them,
    so TI, BWT and the changes are the means over seeds (they are linear in the tuned scores) and
    the interval is the bootstrap interval of that mean over examples.
    `metric`: "correct" (the task's score) or "gold_nll" (gold-answer NLL per token; a negative
    change is the model finding the gold answers likelier)."""
    tuned_dirs = list(tuned_dir) if isinstance(tuned_dir, (list, tuple)) else [tuned_dir]
    base, runs = _per_example(base_dir, metric), [_per_example(d, metric) for d in tuned_dirs]
    if target not in base or any(set(base) != set(run) for run in runs):
        raise ValueError(f"{base_dir} and {', '.join(map(str, tuned_dirs))} must hold the same tasks, "
                         f"the target {target!r} among them")
    for task in base:
        if any(run[task].keys() != runs[0][task].keys() for run in runs):
            raise ValueError(f"{task}: the fine-tuned evaluations scored different examples; evaluate with the same rows")
    tuned = {task: {key: float(np.mean([run[task][key] for run in runs])) for key in runs[0][task]} for task in base}
    rng = np.random.default_rng(seed)
    draws, absolute = {}, {}
    for task in base:
        b, t = base[task], tuned[task]
        if b.keys() != t.keys():
            raise ValueError(f"{task}: the two evaluations scored different examples; evaluate with the same --limit")
        keys = sorted(b)
        bv, tv = np.array([b[k] for k in keys]), np.array([t[k] for k in keys])
        index = rng.integers(0, len(keys), size=(samples, len(keys)))
        draws[task] = (bv.mean(), tv.mean(), bv[index].mean(axis=1), tv[index].mean(axis=1))
        delta = tv[index].mean(axis=1) - bv[index].mean(axis=1)
        absolute[task] = (float(tv.mean() - bv.mean()), (float(np.percentile(delta, 2.5)), float(np.percentile(delta, 97.5))))

    def relative(task, resampled: bool):
        b, t, b_draws, t_draws = draws[task]
        with np.errstate(divide="ignore", invalid="ignore"):
            return (t_draws - b_draws) / b_draws if resampled else (t - b) / b

    others = [task for task in base if task != target]
    ti_draws = relative(target, True)
    bwt_draws = np.mean([relative(task, True) for task in others], axis=0) if others else np.full(samples, np.nan)
    return Forgetting(
        target=target, ti=float(relative(target, False)), ti_interval=_percentiles(ti_draws),
        bwt=float(np.mean([relative(task, False) for task in others])) if others else math.nan,
        bwt_interval=_percentiles(bwt_draws), absolute=absolute)


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    return (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))) if values.size else (math.nan, math.nan)


def _per_example(results_dir: Path, metric: str = "correct") -> dict[str, dict[str, float]]:
    """task -> {example id: value}: 1.0 correct / 0.0 wrong (decided examples only), or the gold NLL."""
    summary = json.loads((Path(results_dir) / RESULTS).read_text())
    out = {}
    for task in summary["tasks"]:
        table = pq.read_table(Path(results_dir) / f"{task}.parquet", columns=["id", metric]).to_pylist()
        out[task] = {row["id"]: float(row[metric]) for row in table
                     if row[metric] is not None and math.isfinite(float(row[metric]))}
    return out
