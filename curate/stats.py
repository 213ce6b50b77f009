"""Perplexity distribution of a scored set, to choose τ: quantiles, and τ -> masked ratio."""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

from curate.store import open_scored

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
THRESHOLDS = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 10.0)


@dataclass
class ScoredStats:
    examples: int
    target_tokens: int
    token_ppl: float  # exp(mean NLL) over all target tokens: the set's token perplexity
    token_ppl_quantiles: dict[float, float]  # per target token: exp(-logprob)
    response_ppl_quantiles: dict[float, float]  # per example: exp(mean NLL of its target tokens)
    masked_ratio: dict[float, float]  # τ -> fraction of target tokens with perplexity > τ


def scored_stats(scored_dir, thresholds=THRESHOLDS, quantiles=QUANTILES) -> ScoredStats:
    """One lazy polars pass per question; the exploded token column is streamed, not held."""
    scan = _scan(scored_dir)
    tokens = _target_nll(scan).with_columns(pl.col("nll").exp().alias("ppl"))
    token_row = tokens.select(
        pl.len().alias("n"), pl.col("nll").mean().exp().alias("token_ppl"),
        *[pl.col("ppl").quantile(q).alias(f"q{q}") for q in quantiles],
        *[(pl.col("ppl") > t).mean().alias(f"t{t}") for t in thresholds],
    ).collect(engine="streaming").row(0, named=True)
    response_row = scan.select(
        pl.len().alias("n"), *[pl.col("ppl").quantile(q).alias(f"q{q}") for q in quantiles]
    ).collect(engine="streaming").row(0, named=True)
    return ScoredStats(
        examples=response_row["n"],
        target_tokens=token_row["n"],
        token_ppl=token_row["token_ppl"],
        token_ppl_quantiles={q: token_row[f"q{q}"] for q in quantiles},
        response_ppl_quantiles={q: response_row[f"q{q}"] for q in quantiles},
        masked_ratio={t: token_row[f"t{t}"] for t in thresholds},
    )


def _scan(scored_dir) -> pl.LazyFrame:
    _, shards = open_scored(scored_dir)
    return pl.scan_parquet([str(s) for s in shards])


def _target_nll(scan: pl.LazyFrame, with_token: bool = False) -> pl.LazyFrame:
    """One row per scored target token of a scored set: its NLL, and its id with `with_token`
    (streamed, not held; the ids are read only when asked for)."""
    columns = ["input_ids", "logprobs", "target"] if with_token else ["logprobs", "target"]
    return (
        scan.select(columns).explode(columns)
        .filter(pl.col("target") & pl.col("logprobs").is_not_null())
        .select(*([pl.col("input_ids").alias("token")] if with_token else []), (-pl.col("logprobs")).alias("nll"))
    )


def ppl_histogram(scored_dir, per: str = "token", bins_per_decade: int = 20, decades: int = 4) -> tuple[list[float], list[float]]:
    """(bin lower edges, share in each bin) of token or response perplexity, on log-spaced
    bins from 1 to 10**decades; the last bin also holds everything above."""
    if per == "token":
        log_ppl = _target_nll(_scan(scored_dir)).select((pl.col("nll") / math.log(10)).alias("log_ppl"))
    else:
        log_ppl = _scan(scored_dir).select(pl.col("nll_mean").drop_nulls() / math.log(10)).rename(
            {"nll_mean": "log_ppl"})
    n_bins = bins_per_decade * decades
    counts = (
        log_ppl.select((pl.col("log_ppl") * bins_per_decade).floor().clip(0, n_bins - 1).cast(pl.Int32).alias("bin"))
        .group_by("bin").len().collect(engine="streaming")
    )
    shares = [0.0] * n_bins
    total = counts["len"].sum() or 1
    for bin_, count in counts.iter_rows():
        shares[bin_] = count / total
    return [10 ** (i / bins_per_decade) for i in range(n_bins)], shares


def surprising_tokens(scored_dir, threshold: float, top: int = 30) -> pl.DataFrame:
    """The token ids most often above τ among target tokens: how often above, how often in
    all, and their token perplexity (exp of mean NLL)."""
    return (
        _target_nll(_scan(scored_dir), with_token=True).group_by("token").agg(
            (pl.col("nll") > math.log(threshold)).sum().alias("above"), pl.len().alias("occurrences"),
            pl.col("nll").mean().exp().alias("ppl"))
        .filter(pl.col("above") > 0).sort(["above", "ppl"], descending=True).head(top)
        .collect(engine="streaming")
    )
