"""The experiment's table: the scores of the base model and of every run, TI, BWT and the absolute
changes with their intervals (on the task score and on gold-answer NLL), per mode over its seeds,
and each step's time; as results.json and results.md."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from curate.evaluate import RESULTS, forgetting
from curate.experiment.config import Run
from curate.experiment.diagnostics import diagnostics_markdown, heldout_markdown
from curate.experiment.layout import CHOICE, arms_of, export_path
from curate.experiment.steps import step_times
from curate.files import write_atomic

TABLE_JSON, TABLE_MD = "results.json", "results.md"


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
    table["arms"] = {arm: seed_aggregate(output, target, members, modes) for arm, members in arms_of(runs).items()}
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


def several_seeds(table: dict) -> bool:
    return any(len(row["runs"]) > 1 for row in (table.get("arms") or {}).values())


SUMMARY_CAPTION = ("Per arm, against the base model: with several seeds, the mean over seeds (the spread across "
                   "seeds as sd, then each seed's value) and the 95% paired bootstrap interval of that mean; with "
                   "one seed, its value and interval. Δ is the absolute change of the target's score; the others "
                   "are relative changes (TI on the target, BWT the mean over the other tasks).")


def arm_summary(table: dict) -> tuple[list[str], list[list[str]]]:
    """One row per arm (mode over its seeds), as README and the report show the outcome: the
    examples it trained, its masked share, the target's score and gold NLL, and forgetting in
    accuracy and in gold NLL; each cell the mean, spread and interval of `seed_aggregate`."""
    target = table["target"]
    header = ["arm", "seeds", "trained examples", "masked", f"Δ {target} score", f"TI gold NLL ({target})",
              "BWT (score)", "BWT gold NLL"]
    rows = []
    for arm, row in table["arms"].items():
        runs = [table["modes"][label] for label in row["runs"]]
        examples = sorted({run["examples"] for run in runs})
        masked = sum(run["masked_ratio"] for run in runs) / len(runs)
        absolute = row["absolute"][target]
        rows.append([arm, str(len(runs)), "/".join(map(str, examples)), f"{masked:.1%}",
                     _summary_cell(absolute, lambda v: f"{v:+.3f}"), _summary_cell(row["ti_nll"], _percent),
                     _summary_cell(row["bwt"], _percent), _summary_cell(row["bwt_nll"], _percent)])
    return header, rows


def _summary_cell(cell: dict, number: Callable[[float], str]) -> str:
    shown = "n/a" if cell["mean"] is None or not math.isfinite(cell["mean"]) else number(cell["mean"])
    if len(cell["per_seed"]) > 1:
        spread = "n/a" if cell["sd"] is None else number(cell["sd"]).lstrip("+")
        shown += f" (sd {spread}: {', '.join(number(v) for v in cell['per_seed'])})"
    return f"{shown} {_interval(cell['interval'], number)}"


def _sd(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2:
        return None
    mean = sum(finite) / len(finite)
    return math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


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
    write_atomic(Path(output) / TABLE_JSON, (json.dumps(table, indent=1) + "\n").encode())
    write_atomic(Path(output) / TABLE_MD, table_markdown(table).encode())


def table_markdown(table: dict) -> str:
    tasks, target = table["tasks"], table["target"]
    named = [f"{t} (target)" if t == target else t for t in tasks]
    lines = []
    if table.get("partial"):
        partial = table["partial"]
        lines += [f"**Partial: {partial['runs_done']} of {partial['runs']} runs trained and evaluated so far** (next: "
                  f"{partial['next']}; `curate experiment` with the same config and output resumes).", ""]
    if table.get("arms"):
        header, rows = arm_summary(table)
        lines += [SUMMARY_CAPTION, "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += ["", "Every run and task:", ""]
    lines += ["| model | " + " | ".join(named) + " |", "|---|" + "---|" * len(tasks)]
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
    if several_seeds(table):
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
    if table.get("heldout_nll"):
        lines += ["", heldout_markdown(table["heldout_nll"], target)]
    if "recipe" in table:
        differing = sorted({k for keys in table["recipe"]["differences"].values() for k in keys})
        lines += ["", f"Every mode trained with `{table['recipe']['recipe']}`; " + (
            f"the rendered configs differ only in {', '.join(differing)}." if differing
            else "one rendered config so far, nothing to compare yet.")]
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
