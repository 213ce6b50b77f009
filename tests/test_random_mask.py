"""`curate export --mode random-mask`: STM's control masks the same share of target tokens, at random."""

import numpy as np
import polars as pl
import pytest

from conftest import run_curate
from curate.export import ExportOptions, export


def _masked_tokens(export_file, scored_dir) -> pl.DataFrame:
    """Recount from the files: one row per target token, its NLL, and whether its label is -100."""
    labels = pl.read_parquet(export_file).select("id", "labels")
    scored = pl.read_parquet(sorted(scored_dir.glob("part-*.parquet"))).select("id", "target", "end_of_turn", "logprobs")
    assert scored["id"].is_unique().all()
    tokens = scored.join(labels, on="id", maintain_order="left").explode("target", "end_of_turn", "logprobs", "labels")
    return tokens.filter(pl.col("target")).with_columns(masked=pl.col("labels") == -100, nll=-pl.col("logprobs"))


def test_random_mask_masks_that_share_of_target_tokens_and_never_the_end_of_turn(tmp_path, scored_sample, tokenizer):
    stats = export(scored_sample, tmp_path / "r.parquet", ExportOptions(mode="random-mask", mask_ratio=0.25, seed=3), tokenizer)
    tokens = _masked_tokens(tmp_path / "r.parquet", scored_sample)
    assert tokens["masked"].sum() == round(0.25 * tokens.height) == stats.masked_tokens
    assert not tokens.filter(pl.col("end_of_turn"))["masked"].any()
    assert stats.seed == 3 and stats.target_tokens == tokens.height


def test_random_mask_is_the_same_for_a_seed_and_differs_between_seeds(tmp_path, scored_sample, tokenizer):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        export(scored_sample, tmp_path / f"{name}.parquet", ExportOptions(mode="random-mask", mask_ratio=0.3, seed=seed), tokenizer)
        runs[name] = _masked_tokens(tmp_path / f"{name}.parquet", scored_sample)["masked"].to_numpy()
    assert np.array_equal(runs["a"], runs["b"])
    assert not np.array_equal(runs["a"], runs["c"]) and runs["a"].sum() == runs["c"].sum()


def test_random_mask_does_not_follow_perplexity(tmp_path, scored_sample, tokenizer):
    """STM masks the most surprising tokens; the control's masked tokens are as surprising as any."""
    export(scored_sample, tmp_path / "r.parquet", ExportOptions(mode="random-mask", mask_ratio=0.3, seed=0), tokenizer)
    export(scored_sample, tmp_path / "s.parquet", ExportOptions(mode="stm", mask_ratio=0.3), tokenizer)
    random, stm = (_masked_tokens(tmp_path / f"{name}.parquet", scored_sample) for name in ("r", "s"))
    random_nll, stm_nll = (t.filter(pl.col("masked"))["nll"].mean() for t in (random, stm))
    assert stm_nll > 2 * random_nll
    assert random_nll == pytest.approx(random["nll"].mean(), rel=0.5)


def test_random_mask_on_the_command_line_needs_a_ratio(tmp_path, scored_sample):
    refused = run_curate("export", scored_sample, "-o", tmp_path / "r.parquet", "--mode", "random-mask", check=False)
    assert refused.returncode != 0 and "--mask-ratio" in refused.stderr
    run_curate("export", scored_sample, "-o", tmp_path / "r.parquet", "--mode", "random-mask", "--mask-ratio", "0.2",
               "--seed", "7", "--quiet")
    assert (tmp_path / "r.parquet").exists()
