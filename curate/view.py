"""Scored examples token by token, for people to look at: each token's text, its perplexity,
and whether STM at τ leaves it out of the loss (the rule of `curate export --mode stm
--threshold τ`: strictly above τ is masked, the end-of-turn token never is).

`curate inspect` renders these views in a terminal (rich), `curate report` in HTML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from curate import masking
from curate.store import open_scored

EXAMPLE_COLUMNS = ["id", "row", "input_ids", "logprobs", "target", "end_of_turn", "n_target", "ppl"]


@dataclass(frozen=True)
class Band:
    upper: float  # perplexity up to and including this
    terminal: str  # rich colour
    html: str  # background colour


def bands(threshold: float) -> list[Band]:
    """Colour bands of token perplexity: easy, up to τ (trained), above τ (masked), far above."""
    return [Band(min(1.5, threshold), "green", "#c7ecd0"), Band(threshold, "yellow", "#fff0a8"),
            Band(4 * threshold, "dark_orange", "#ffc38a"), Band(math.inf, "red", "#ff8f8f")]


@dataclass(frozen=True)
class TokenView:
    text: str
    ppl: float | None  # exp(-logprob); None where not scored (the first token)
    target: bool  # assistant content (or its end-of-turn): what training sees
    masked: bool  # a target token that STM at τ leaves out of the loss


def token_views(example: dict, tokenizer, threshold: float = masking.DEFAULT_THRESHOLD) -> list[TokenView]:
    """The tokens of one scored row (a dict with `input_ids`, `logprobs`, `target`, `end_of_turn`)."""
    ids = np.asarray(example["input_ids"], dtype=np.int64)
    logprobs = np.array([np.nan if v is None else v for v in example["logprobs"]], dtype=np.float64)
    target = np.asarray(example["target"], dtype=bool)
    protected = target & np.asarray(example["end_of_turn"], dtype=bool)
    keep = masking.protect(masking.threshold_keep(logprobs, target, threshold), target, protected)
    texts = token_texts(ids.tolist(), tokenizer)
    return [
        TokenView(texts[i], None if np.isnan(logprobs[i]) else float(np.exp(-logprobs[i])), bool(target[i]),
                  bool(target[i] and not keep[i]))
        for i in range(ids.size)
    ]


def token_texts(ids: list[int], tokenizer) -> list[str]:
    """Each token's text as it reads in context (SentencePiece drops a lone token's leading
    space, so each token is decoded after its predecessor). A character split over several
    byte tokens is shown whole on the last of them, and '' on the others."""
    texts, start = [], 0  # start: first token whose text is not shown yet
    for end in range(1, len(ids) + 1):
        context = max(0, start - 1)
        before = tokenizer.decode(ids[context:start])
        whole = tokenizer.decode(ids[context:end])
        piece = whole[len(before):] if whole.startswith(before) else tokenizer.decode(ids[start:end])
        if piece.endswith("\ufffd") and end - start < 4:
            texts.append("")
            continue
        texts.append(piece)
        start = end
    return texts


def select_examples(scored_dir: Path, ids=(), indices=(), top: int | None = None) -> list[dict]:
    """Scored rows by `id`, by position in the set (0-based `index`), or the `top` highest
    response perplexities. Raises KeyError naming what is not there."""
    _, shards = open_scored(scored_dir)
    scan = pl.scan_parquet([str(s) for s in shards]).select(EXAMPLE_COLUMNS).with_row_index("index")
    if ids:
        found = scan.filter(pl.col("id").is_in([str(i) for i in ids])).collect()
        missing = sorted(set(map(str, ids)) - set(found["id"]))
        wanted = [str(i) for i in ids]
        found = found.sort(pl.col("id").replace_strict(wanted, list(range(len(wanted))), default=None))
    elif indices:
        found = scan.filter(pl.col("index").is_in(list(indices))).collect()
        missing = sorted(set(indices) - set(found["index"]))
    else:
        found, missing = scan.sort("ppl", descending=True, nulls_last=True).head(top or 1).collect(), []
    if missing:
        raise KeyError(f"{scored_dir}: no example with {'id' if ids else 'index'} {', '.join(map(str, missing))}")
    return found.to_dicts()


def spread_indices(scored_dir: Path, count: int) -> list[int]:
    """Indices of `count` examples spread evenly over the set, most surprising response first."""
    _, shards = open_scored(scored_dir)
    by_ppl = (pl.scan_parquet([str(s) for s in shards]).select("ppl").with_row_index("index")
              .sort("ppl", descending=True, nulls_last=True).collect()["index"])
    picks = sorted({int(i) for i in np.linspace(0, len(by_ppl) - 1, min(count, len(by_ppl)))}) if len(by_ppl) else []
    return [int(by_ppl[i]) for i in picks]


def band_of(ppl: float, threshold: float) -> Band:
    return next(band for band in bands(threshold) if ppl <= band.upper)


# ---------------------------------------------------------------- terminal


def render_terminal(example: dict, views: list[TokenView], threshold: float, console) -> None:
    """Prompt tokens dim, target tokens coloured by perplexity, masked ones struck through.
    Without colour (not a terminal), masked tokens are marked [[like this]] instead."""
    from rich.text import Text

    plain = console.color_system is None
    masked = sum(v.masked for v in views)
    console.rule(f"id {example['id']} · index {example.get('index', '?')} · row {example['row']}")
    console.print(f"response perplexity {example['ppl']:.3f} · {masked} of {example['n_target']} target "
                  f"tokens above τ = {threshold:g} (masked by STM)", highlight=False)
    text = Text()
    for view in views:
        if not view.target:
            text.append(view.text, style="dim")
        elif plain and view.masked:
            text.append(f"[[{view.text}]]")
        else:
            colour = "grey50" if view.ppl is None else band_of(view.ppl, threshold).terminal
            text.append(view.text, style=colour + (" strike" if view.masked else ""))
    console.print(text, highlight=False, markup=False)
    surprising = sorted((v for v in views if v.masked), key=lambda v: -v.ppl)[:10]
    if surprising:
        listed = ", ".join(f"{v.text!r} {v.ppl:.1f}" for v in surprising)
        console.print(f"most surprising: {listed}", highlight=False, markup=False)


def render_legend(threshold: float, console) -> None:
    from rich.text import Text

    legend = Text("legend: ")
    legend.append("prompt/template", style="dim")
    lower = 1.0
    for band in bands(threshold):
        label = f"ppl > {lower:g}" if math.isinf(band.upper) else f"ppl {lower:g}–{band.upper:g}"
        legend.append("  ")
        legend.append(label, style=band.terminal + (" strike" if lower >= threshold else ""))
        lower = band.upper
    if console.color_system is None:
        legend.append(f"  [[token]]: masked (ppl > τ = {threshold:g})")
    else:
        legend.append(f"  struck through: masked (ppl > τ = {threshold:g})")
    console.print(legend, highlight=False, markup=False)
