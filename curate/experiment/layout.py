"""Where an experiment keeps what (see the package's docstring), for the steps and the table alike."""

from __future__ import annotations

import json
from pathlib import Path

from curate.experiment.config import Run

TOKENS = "tokens"  # tokens/<base|run>/: the target's held-out gold answers, scored token by token
CHOICE = "checkpoint.json"  # models/<run>/checkpoint.json: each epoch's validation gold NLL and the chosen one


def export_path(output: Path, label: str) -> Path:
    return Path(output) / "exports" / f"{label}.parquet"


def trained_model(output: Path, label: str) -> Path:
    """The directory `curate eval` loads: the chosen epoch's checkpoint (checkpoint: best-validation-nll),
    the merged model for a LoRA recipe, else Axolotl's output."""
    run_dir = Path(output) / "models" / label
    if (run_dir / CHOICE).exists():
        return run_dir / json.loads((run_dir / CHOICE).read_text())["chosen"]
    return run_dir / "merged" if (run_dir / "merged").is_dir() else run_dir


def arms_of(runs: list[Run]) -> dict[str, list[str]]:
    """mode label -> the labels of its runs (one per seed)."""
    arms: dict[str, list[str]] = {}
    for run in runs:
        arms.setdefault(run.mode.label, []).append(run.label)
    return arms
