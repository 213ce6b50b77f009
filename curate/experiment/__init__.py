"""`curate experiment`: the study's comparison, one command. For one model, one training set
and several modes (ground truth, STM, a random-mask control, self-output, rephrase), it scores,
exports, fine-tunes each mode with the same Axolotl recipe, evaluates the base model and every
fine-tuned one, and tables TI, BWT and the absolute changes with their intervals.

- config.py: the typed config (`ExperimentConfig`), its modes and runs;
- steps.py: run-once steps and their done markers; model work in subprocesses;
- run.py: the steps in order (`run_experiment`);
- table.py: the table (results.json, results.md); diagnostics.py: what each masking run masked,
  and held-out gold NLL split by the base model's token perplexity;
- layout.py: where things are in the output directory.

Model work (scoring, generating, evaluating, training) runs the `curate` command line or
`axolotl` in a subprocess, so no two engines ever share a process; export and the recipe check
load no model and run here. Each finished step leaves `steps/<step>.json` holding its options: a
rerun skips finished steps, and refuses (naming the option) a step finished with other options.
Layout of the output directory:

    experiment.json      the config as run          data/        train.jsonl, held-out eval rows
    scored/              the training set, scored   exports/     <mode>.parquet (+ .stats.json)
    configs/<run>.yml    the rendered recipes       models/      fine-tuned models
    evals/<base|run>/    `curate eval` results      results.json, results.md: the table
    validation/<run>/    target-task gold NLL of each epoch's checkpoint (checkpoint: best-validation-nll)
    tokens/<base|run>/   the target's held-out gold answers scored token by token (a generation target)

A run is a mode trained with one seed: with `seeds`, `<mode>-seed<S>`; without, the mode's label.
Runs of one mode with several seeds are aggregated in results.md (mean, spread across seeds,
bootstrap interval of the seed mean).
"""

from curate.experiment.config import CONFIG, ExperimentConfig, ExperimentError, Mode, Run
from curate.experiment.diagnostics import CATEGORIES, mask_diagnostics, token_categories
from curate.experiment.run import DATA_KEYS, config_differences, run_experiment
from curate.experiment.table import TABLE_JSON, TABLE_MD, build_table, seed_aggregate, table_markdown

__all__ = ["CATEGORIES", "CONFIG", "DATA_KEYS", "TABLE_JSON", "TABLE_MD", "ExperimentConfig", "ExperimentError", "Mode",
           "Run", "build_table", "config_differences", "mask_diagnostics", "run_experiment", "seed_aggregate",
           "table_markdown", "token_categories"]
