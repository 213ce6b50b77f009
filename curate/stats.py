"""Perplexity distribution of a scored set, to choose τ: quantiles, and τ -> masked ratio."""

from __future__ import annotations

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
    _, shards = open_scored(scored_dir)
    scan = pl.scan_parquet([str(s) for s in shards])
    tokens = (
        scan.select("logprobs", "target").explode("logprobs", "target")
        .filter(pl.col("target") & pl.col("logprobs").is_not_null())
        .select((-pl.col("logprobs")).alias("nll"))
        .with_columns(pl.col("nll").exp().alias("ppl"))
    )
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
