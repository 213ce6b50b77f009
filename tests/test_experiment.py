"""`curate experiment` end to end, tiny: real model, real ARC-Easy rows, real Axolotl (2 steps), real evals."""

import json
import math

import numpy as np
import polars as pl
import pytest
import yaml

from conftest import run_curate
from test_finetune import AXOLOTL_BIN
from test_report import browser  # noqa: F401  (the real headless chromium fixture)

pytestmark = pytest.mark.slow

MODES = ["ground-truth", "stm"]
LABELS = ["ground-truth", "stm-tau2.5"]


def _config(folder, max_steps: int = 2) -> str:
    path = folder / f"config-{max_steps}.yml"
    path.write_text(yaml.safe_dump({"train": "arc_easy", "train_limit": 6, "target": "arc_easy",
                                    "eval_tasks": ["arc_easy", "piqa"], "eval_limit": 8, "modes": MODES,
                                    "max_steps": max_steps}))
    return path


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    assert (AXOLOTL_BIN / "axolotl").exists(), "Axolotl's environment is missing: run `make axolotl`"
    folder = tmp_path_factory.mktemp("experiment")
    out = folder / "out"
    run_curate("experiment", _config(folder), "-o", out, "--axolotl", AXOLOTL_BIN / "axolotl")
    return folder, out


def _mean_correct(out, label: str, task: str) -> float:
    return pl.read_parquet(out / "evals" / label / f"{task}.parquet")["correct"].cast(pl.Float64).mean()


def test_ti_and_bwt_are_the_relative_changes_of_the_per_example_results(experiment):
    _, out = experiment
    table = json.loads((out / "results.json").read_text())
    assert list(table["modes"]) == LABELS and table["tasks"] == ["arc_easy", "piqa"]
    for label in LABELS:
        base = {task: _mean_correct(out, "base", task) for task in table["tasks"]}
        tuned = {task: _mean_correct(out, label, task) for task in table["tasks"]}
        row = table["modes"][label]
        assert row["ti"] == pytest.approx((tuned["arc_easy"] - base["arc_easy"]) / base["arc_easy"])
        assert row["bwt"] == pytest.approx((tuned["piqa"] - base["piqa"]) / base["piqa"])
        for task in table["tasks"]:
            assert row["absolute"][task]["change"] == pytest.approx(tuned[task] - base[task])
            low, high = row["absolute"][task]["interval"]
            assert low <= row["absolute"][task]["change"] <= high
        assert table["scores"][label]["piqa"]["score"] == pytest.approx(tuned["piqa"])
    assert "| stm-tau2.5 |" in (out / "results.md").read_text()


def test_every_mode_trained_on_the_same_recipe_only_the_data_differs(experiment):
    _, out = experiment
    configs = {label: yaml.safe_load((out / "configs" / f"{label}.yml").read_text()) for label in LABELS}
    for label, config in configs.items():
        assert config["datasets"][0]["path"] == str(out / "exports" / f"{label}.parquet")
        config["datasets"][0].pop("path")
        config.pop("output_dir"), config.pop("dataset_prepared_path")
        state = json.loads((out / "models" / label / "trainer_state.json").read_text())
        assert state["global_step"] == 2
    assert configs["ground-truth"] == configs["stm-tau2.5"]
    stm = json.loads((out / "exports" / "stm-tau2.5.stats.json").read_text())
    assert stm["masked_tokens"] > 0


def test_training_rows_are_not_among_the_evaluated_ones(experiment):
    _, out = experiment
    trained = set(pl.read_ndjson(out / "data" / "train.jsonl")["id"])
    evaluated = set(pl.read_parquet(out / "evals" / "base" / "arc_easy.parquet")["id"])
    assert len(trained) == 6 and len(evaluated) == 8 and not trained & evaluated


def test_a_rerun_redoes_no_finished_step_and_other_options_are_refused(experiment):
    folder, out = experiment
    markers = {p.name: p.stat().st_mtime_ns for p in (out / "steps").iterdir()}
    rerun = run_curate("experiment", _config(folder), "-o", out, "--axolotl", AXOLOTL_BIN / "axolotl")
    assert rerun.stderr.count("done before, skipped") == len(markers) and " ...\n" not in rerun.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "steps").iterdir()} == markers
    refused = run_curate("experiment", _config(folder, max_steps=3), "-o", out, "--axolotl", AXOLOTL_BIN / "axolotl",
                         check=False)
    assert refused.returncode == 1 and "max_steps=2" in refused.stderr and "max_steps=3" in refused.stderr


def test_the_report_shows_the_experiment_in_a_real_browser(experiment, tmp_path, browser):  # noqa: F811
    from curate.report_experiment import CHARTS

    _, out = experiment
    run_curate("report", out, "-o", tmp_path / "report.html")
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto((tmp_path / "report.html").as_uri())
    for chart in CHARTS:
        page.wait_for_selector(f"#{chart} .main-svg")
    assert page.locator("#experiment-modes tr").count() == 1 + len(LABELS) and not errors
    page.close()


# ---------------------------------------------------------------- the short-answer trap (no Axolotl needed)


@pytest.fixture(scope="module")
def scored_tasks(tmp_path_factory, model_dir, hf_engine, chat_tokenizer):
    """The first training rows of ARC-Easy (answers of a few words) and GSM8K (worked solutions), really scored."""
    from curate.benchmarks import split_of, write_jsonl
    from curate.evaluate import task_file
    from curate.files import read_jsonl
    from curate.score import score_dataset

    folder, scored = tmp_path_factory.mktemp("short-answers"), {}
    for task, split in (("arc_easy", "test"), ("gsm8k", "train")):
        rows = [row for row in read_jsonl(task_file(task, split)) if split_of(row["id"]) == "train"][:12]
        write_jsonl(folder / f"{task}.jsonl", rows)
        scored[task] = folder / f"{task}-scored"
        score_dataset(folder / f"{task}.jsonl", scored[task], hf_engine, chat_tokenizer, model_name="default",
                      model_dir=model_dir)
    return folder, scored


def test_stm_on_short_answers_warns_and_names_mask_ratio(scored_tasks):
    folder, scored = scored_tasks
    shown = run_curate("export", scored["arc_easy"], "-o", folder / "arc-stm.parquet", "--mode", "stm", "--quiet")
    stats = json.loads((folder / "arc-stm.stats.json").read_text())
    assert stats["masked_ratio"] > 0.5
    assert "warning:" in shown.stderr and "long answers" in shown.stderr and "--mask-ratio" in shown.stderr
    assert stats["warnings"] and "--mask-ratio" in stats["warnings"][0]
    by_share = run_curate("export", scored["arc_easy"], "-o", folder / "arc-ratio.parquet", "--mode", "stm",
                          "--mask-ratio", "0.2", "--quiet")
    assert "warning:" not in by_share.stderr
    assert 0 < json.loads((folder / "arc-ratio.stats.json").read_text())["masked_ratio"] <= 0.2


def test_stm_on_worked_solutions_masks_under_half_and_does_not_warn(scored_tasks):
    folder, scored = scored_tasks
    shown = run_curate("export", scored["gsm8k"], "-o", folder / "gsm8k-stm.parquet", "--mode", "stm", "--quiet")
    stats = json.loads((folder / "gsm8k-stm.stats.json").read_text())
    assert 0.1 < stats["masked_ratio"] < 0.5 and not stats["warnings"] and "warning:" not in shown.stderr


# ---------------------------------------------------------------- seeds, aggregated (no model needed)


def _eval_dir(folder, outcomes: dict[str, tuple[list[int], list[float]]]):
    """A `curate eval` result directory: per task, each example's correctness and gold NLL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    for task, (correct, nll) in outcomes.items():
        pq.write_table(pa.table({"id": [f"{task}-{i}" for i in range(len(correct))], "correct": [bool(c) for c in correct],
                                 "gold_nll": nll}), folder / f"{task}.parquet")
    summary = {task: {"score": sum(c) / len(c), "interval": [0, 1], "metric": "acc", "examples": len(c),
                      "gold_nll": sum(n) / len(n)} for task, (c, n) in outcomes.items()}
    (folder / "results.json").write_text(json.dumps({"model": str(folder), "tasks": summary}))


def test_seed_aggregation_is_recomputed_from_the_per_example_files(tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    from curate.experiment import ExperimentConfig, build_table, table_markdown

    rng = np.random.default_rng(7)
    tasks, rows, seeds = ["gsm8k", "piqa", "sciq"], 60, 3
    out = tmp_path / "out"

    def outcomes(accuracy):
        return {t: ((rng.random(rows) < accuracy).astype(int).tolist(), (2 + rng.random(rows)).tolist()) for t in tasks}

    _eval_dir(out / "evals" / "base", outcomes(0.5))
    config = ExperimentConfig(train="gsm8k", target="gsm8k", eval_tasks=tasks, modes=["ground-truth", "stm"],
                              seeds=list(range(1, seeds + 1)), seeded_modes=["ground-truth"])
    runs = config.runs()
    assert [r.label for r in runs] == ["ground-truth-seed1", "stm-tau2.5-seed1", "ground-truth-seed2", "ground-truth-seed3"]
    for run in runs:
        _eval_dir(out / "evals" / run.label, outcomes(0.4 + 0.05 * (run.seed or 0)))
        stats = out / "exports" / f"{run.export_label}.stats.json"
        stats.parent.mkdir(parents=True, exist_ok=True)
        stats.write_text(json.dumps({"examples_out": 10, "examples_in": 10, "trained_tokens": 100, "masked_ratio": 0.0}))
    table = build_table(out, "gsm8k", runs)
    assert set(table["arms"]) == {"ground-truth", "stm-tau2.5"}

    def mean(label, task, column):
        return float(np.mean(pq.read_table(out / "evals" / label / f"{task}.parquet")[column].to_numpy().astype(float)))

    labels = [f"ground-truth-seed{s}" for s in range(1, seeds + 1)]
    arm = table["arms"]["ground-truth"]
    for key, column in (("ti", "correct"), ("ti_nll", "gold_nll")):
        per_seed = [(mean(label, "gsm8k", column) - mean("base", "gsm8k", column)) / mean("base", "gsm8k", column)
                    for label in labels]
        assert arm[key]["per_seed"] == pytest.approx(per_seed)
        assert arm[key]["mean"] == pytest.approx(np.mean(per_seed))
        assert arm[key]["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    for key, column in (("bwt", "correct"), ("bwt_nll", "gold_nll")):
        per_seed = [np.mean([(mean(label, t, column) - mean("base", t, column)) / mean("base", t, column)
                             for t in ("piqa", "sciq")]) for label in labels]
        assert arm[key]["mean"] == pytest.approx(np.mean(per_seed))
        assert arm[key]["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    for task in tasks:
        changes = [mean(label, task, "correct") - mean("base", task, "correct") for label in labels]
        cell = arm["absolute"][task]
        assert cell["mean"] == pytest.approx(np.mean(changes)) and cell["sd"] == pytest.approx(np.std(changes, ddof=1))
        # The interval: an independent paired bootstrap of the seed mean over examples, within resampling noise.
        base = pq.read_table(out / "evals" / "base" / f"{task}.parquet")["correct"].to_numpy().astype(float)
        tuned = np.mean([pq.read_table(out / "evals" / label / f"{task}.parquet")["correct"].to_numpy().astype(float)
                         for label in labels], axis=0)
        index = np.random.default_rng(123).integers(0, rows, size=(4000, rows))
        low, high = np.percentile(tuned[index].mean(axis=1) - base[index].mean(axis=1), [2.5, 97.5])
        assert cell["interval"][0] == pytest.approx(low, abs=0.03) and cell["interval"][1] == pytest.approx(high, abs=0.03)
        assert cell["interval"][0] <= cell["mean"] <= cell["interval"][1]
    single = table["arms"]["stm-tau2.5"]
    assert single["ti"]["sd"] is None and single["ti"]["mean"] == pytest.approx(table["modes"]["stm-tau2.5-seed1"]["ti"])
    shown = table_markdown(table)
    assert f"| ground-truth | {seeds} | TI (gsm8k) |" in shown and "spread across seeds" in shown
    # The one-row-per-arm outcome (README's table) carries the same numbers, recomputed here.
    bwt_nll = [np.mean([(mean(label, t, "gold_nll") - mean("base", t, "gold_nll")) / mean("base", t, "gold_nll")
                        for t in ("piqa", "sciq")]) for label in labels]
    row = next(line for line in shown.splitlines() if line.startswith("| ground-truth | 3 | 10 |"))
    cell = row.split(" | ")[-1]
    assert cell.startswith(f"{np.mean(bwt_nll):+.1%} (sd {np.std(bwt_nll, ddof=1):.1%}: ")
    assert ", ".join(f"{v:+.1%}" for v in bwt_nll) in cell
    single_row = next(line for line in shown.splitlines() if line.startswith("| stm-tau2.5 | 1 |"))
    assert "sd" not in single_row and f"{table['modes']['stm-tau2.5-seed1']['bwt']:+.1%} [" in single_row
    # A run stopped part way says so, in results.md and in the report, not only in a log.
    from curate.experiment.table import write_table
    from curate.report_experiment import experiment_section

    write_table(table, out)
    section = experiment_section(out)
    assert "Partial" not in section and 'id="experiment-summary"' in section and 'id="experiment-seeds"' in section
    write_table(table | {"partial": {"runs_done": 2, "runs": 4, "next": "ground-truth-seed2"}}, out)
    assert "Partial: 2 of 4 runs" in (out / "results.md").read_text() and "Partial: 2 of 4 runs" in experiment_section(out)


# ---------------------------------------------------------------- the GSM8K config, pre-registered; a tiny run of its shape

ROOT_CONFIG = "recipes/experiment/smollm2-135m-gsm8k.yml"


def test_the_preregistered_gsm8k_config_has_every_arm_and_three_seeds_where_asked():
    from curate.experiment import ExperimentConfig

    config = ExperimentConfig.load(ROOT_CONFIG)
    runs = config.runs()
    per_mode = {}
    for run in runs:
        per_mode.setdefault(run.mode.label, []).append(run.seed)
    assert list(per_mode) == ["ground-truth", "stm-tau2.5", "stm-ratio0.2", "random-mask", "self-output", "rephrase"]
    assert all(len(per_mode[m]) >= 3 for m in ("ground-truth", "stm-tau2.5", "stm-ratio0.2", "random-mask"))
    assert config.train == "gsm8k" and config.checkpoint == "best-validation-nll"
    assert (config.samples, config.temperature, config.top_p) == (4, 0.7, 0.95)
    assert {"arc_easy", "piqa", "sciq", "hellaswag"} <= set(config.eval_tasks)


def test_token_kinds_of_a_worked_solution():
    from curate.experiment import token_categories

    pieces = ["He", " pays", " 48", "/", "2", " =", " <<", "48", "/", "2", "=", "24", ">>", "24", ".", "\n", "####", " 24"]
    kinds = token_categories(pieces)
    assert kinds[:6] == ["word", "word", "number", "formatting", "number", "formatting"]
    assert kinds[6:13] == ["calculator"] * 7
    assert kinds[13:] == ["number", "formatting", "formatting", "formatting", "number"]


def _tiny_gsm8k_config(folder) -> str:
    """The GSM8K config's shape at its smallest: 4 training rows, 2 epochs, 2 seeds of ground truth, one of STM."""
    path = folder / "gsm8k-tiny.yml"
    path.write_text(yaml.safe_dump({
        "train": "gsm8k", "train_limit": 4, "target": "gsm8k", "eval_tasks": ["gsm8k", "arc_easy"],
        "eval_limit": {"gsm8k": 2, "arc_easy": 4}, "modes": ["ground-truth", "stm"], "seeds": [1, 2],
        "seeded_modes": ["ground-truth"], "recipe": "recipes/experiment/axolotl/smollm2-135m-gsm8k.yml",
        "epochs": 2, "checkpoint": "best-validation-nll", "validation_limit": 4, "max_new_tokens": 16}))
    return path


@pytest.fixture(scope="module")
def gsm8k_experiment(tmp_path_factory):
    assert (AXOLOTL_BIN / "axolotl").exists(), "Axolotl's environment is missing: run `make axolotl`"
    folder = tmp_path_factory.mktemp("gsm8k")
    out = folder / "out"
    run_curate("experiment", _tiny_gsm8k_config(folder), "-o", out, "--axolotl", AXOLOTL_BIN / "axolotl")
    return out


def test_seeds_train_apart_and_only_the_seed_and_data_differ(gsm8k_experiment):
    out = gsm8k_experiment
    table = json.loads((out / "results.json").read_text())
    assert list(table["modes"]) == ["ground-truth-seed1", "stm-tau2.5-seed1", "ground-truth-seed2"]  # seed by seed
    for label, seed in (("ground-truth-seed1", 1), ("ground-truth-seed2", 2), ("stm-tau2.5-seed1", 1)):
        assert yaml.safe_load((out / "configs" / f"{label}.yml").read_text())["seed"] == seed
    assert set(k for keys in table["recipe"]["differences"].values() for k in keys) <= {
        "datasets.0.path", "dataset_prepared_path", "output_dir", "seed"}
    arm = table["arms"]["ground-truth"]
    assert arm["runs"] == ["ground-truth-seed1", "ground-truth-seed2"] and arm["ti_nll"]["sd"] is not None
    shown = (out / "results.md").read_text()
    assert "spread across seeds" in shown and "Step times" in shown and "Checkpoint evaluated" in shown


def test_the_evaluated_checkpoint_is_the_epoch_of_lowest_validation_gold_nll(gsm8k_experiment):
    out = gsm8k_experiment
    for label in ("ground-truth-seed1", "ground-truth-seed2", "stm-tau2.5-seed1"):
        choice = json.loads((out / "models" / label / "checkpoint.json").read_text())
        nll = {name: c["gold_nll"] for name, c in choice["checkpoints"].items()}
        assert len(nll) == 2 and choice["chosen"] == min(nll, key=nll.get)
        assert sorted(p.name for p in (out / "models" / label).glob("checkpoint-*/")) == [choice["chosen"]]
        marker = json.loads((out / "steps" / f"eval--{label}.json").read_text())
        assert marker["options"]["model"] == str(out / "models" / label / choice["chosen"])
        # The choice read validation rows only: none of them is trained on or evaluated.
        validation = set(pl.read_parquet(out / "validation" / label / choice["chosen"] / "gsm8k.parquet")["id"])
        tested = set(pl.read_parquet(out / "evals" / label / "gsm8k.parquet")["id"])
        trained = set(pl.read_ndjson(out / "data" / "train.jsonl")["id"])
        assert validation and not validation & tested and not validation & trained


def test_the_masked_tokens_are_described_by_kind(gsm8k_experiment):
    out = gsm8k_experiment
    found = json.loads((out / "results.json").read_text())["diagnostics"]["stm-tau2.5"]
    stats = json.loads((out / "exports" / "stm-tau2.5.stats.json").read_text())
    assert found["masked_tokens"] == stats["masked_tokens"] and found["target_tokens"] == stats["target_tokens"]
    assert sum(found["masked_share"].values()) == pytest.approx(1.0)
    assert found["target_share"]["calculator"] > 0 and found["top"]


def test_the_report_shows_seeds_and_what_was_masked(gsm8k_experiment, tmp_path):
    run_curate("report", gsm8k_experiment, "-o", tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    for element in ("experiment-seeds", "experiment-masked", "experiment-nll", "experiment-heldout"):
        assert f'id="{element}"' in page


def _target_nll(out, label: str) -> tuple[list, np.ndarray]:
    """Every held-out row's tokens and the NLL of its target tokens, read straight from the Parquet shards."""
    frame = pl.read_parquet(out / "tokens" / label / "*.parquet").sort("id")
    nll = [-np.asarray(lp, dtype=np.float64)[np.asarray(t, dtype=bool)] for lp, t in zip(frame["logprobs"], frame["target"])]
    return frame["input_ids"].to_list(), np.concatenate(nll)


def test_the_heldout_gold_nll_is_split_by_the_base_models_token_perplexity(gsm8k_experiment):
    out = gsm8k_experiment
    split = json.loads((out / "results.json").read_text())["heldout_nll"]
    held_out = sorted(pl.read_ndjson(out / "data" / "gsm8k.jsonl")["id"])
    assert sorted(pl.read_parquet(out / "tokens" / "base" / "*.parquet")["id"]) == held_out  # every row, once
    tokens, base = _target_nll(out, "base")
    surprising = base > math.log(2.5)  # STM's rule: token perplexity exp(NLL) above tau = 2.5
    assert surprising.any() and (~surprising).any() and split["surprising_share"] == pytest.approx(surprising.mean())
    for label in ("base", "ground-truth-seed1", "stm-tau2.5-seed1", "ground-truth-seed2"):
        run_tokens, nll = _target_nll(out, label)
        assert run_tokens == tokens
        found = split["nll"][label]
        assert found["all"] == pytest.approx(nll.mean())
        assert found["surprising"] == pytest.approx(nll[surprising].mean())
        assert found["kept"] == pytest.approx(nll[~surprising].mean())
    # Each run's tokens were scored by the checkpoint that was evaluated, not by another model.
    for label in ("ground-truth-seed1", "stm-tau2.5-seed1"):
        evaluated = json.loads((out / "steps" / f"eval--{label}.json").read_text())["options"]["model"]
        assert json.loads((out / "tokens" / label / "manifest.json").read_text())["meta"]["model"] == evaluated
    assert "base ppl > τ" in (out / "results.md").read_text()
