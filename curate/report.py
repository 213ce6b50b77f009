"""`curate report`: one self-contained HTML page that shows where the perplexity is.

Charts are plotly figures with plotly.js inlined once, so the page needs no network when
it is opened. With several scored sets (say the ground truth and the model's own answers)
their distributions are overlaid and their means and medians tabled side by side.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from curate import masking
from curate.stats import ppl_histogram, scored_stats, surprising_tokens
from curate.store import open_scored, refuse_overlap, write_atomic
from curate.view import TokenView, band_of, bands, select_examples, spread_indices, token_views

CHARTS = ("token-ppl", "response-ppl", "threshold-curve")  # element ids, checked by the tests


def threshold_grid(threshold: float) -> list[float]:
    """τ values for the threshold -> masked-ratio curve: 1 to 50, log-spaced, plus τ itself."""
    return sorted({round(float(t), 4) for t in np.geomspace(1.05, 50, 48)} | {threshold})


def build_report(scored_dirs: list[Path], tokenizers: list, threshold: float = masking.DEFAULT_THRESHOLD,
                 examples: int = 6, top_tokens: int = 30, experiments: list[Path] = ()) -> str:
    """The report page as one HTML string; `experiments`: `curate experiment` directories, each a section."""
    import plotly.offline

    from curate.report_experiment import experiment_section

    names = [_name(d) for d in scored_dirs] + [_name(d) for d in experiments]
    sections = [experiment_section(directory) for directory in experiments]
    if scored_dirs:
        sections += _scored_sections(scored_dirs, tokenizers, threshold, examples, top_tokens)
    return _PAGE.format(title=html.escape("curate report: " + ", ".join(names)), plotly=plotly.offline.get_plotlyjs(),
                        legend=_legend(threshold) if scored_dirs else "", body="\n".join(sections))


def _scored_sections(scored_dirs: list[Path], tokenizers: list, threshold: float, examples: int,
                     top_tokens: int) -> list[str]:
    import plotly.graph_objects as go

    names = [_name(d) for d in scored_dirs]
    grid = threshold_grid(threshold)
    stats = [scored_stats(d, thresholds=grid, quantiles=(0.5,)) for d in scored_dirs]

    figures = {}
    for chart, per, title in (("token-ppl", "token", "per-token perplexity (target tokens)"),
                              ("response-ppl", "response", "per-response perplexity")):
        figure = go.Figure()
        for name, directory in zip(names, scored_dirs):
            edges, shares = ppl_histogram(directory, per=per)
            figure.add_trace(go.Scatter(x=edges, y=shares, name=name, mode="lines", line_shape="hv", fill="tozeroy"))
        figure.add_vline(x=threshold, line_dash="dash", annotation_text=f"τ = {threshold:g}")
        figure.update_layout(title=title, xaxis_title="perplexity (log scale)", yaxis_title="share",
                             xaxis_type="log", yaxis_tickformat=".0%")
        figures[chart] = figure
    curve = go.Figure()
    for name, stat in zip(names, stats):
        curve.add_trace(go.Scatter(x=list(stat.masked_ratio), y=list(stat.masked_ratio.values()), name=name, mode="lines"))
    curve.add_vline(x=threshold, line_dash="dash", annotation_text=f"τ = {threshold:g}")
    curve.update_layout(title="threshold τ → share of target tokens masked", xaxis_title="τ (log scale)",
                        yaxis_title="masked", xaxis_type="log", yaxis_tickformat=".0%")
    figures["threshold-curve"] = curve

    charts_html = "\n".join(
        f'<section class="chart">{figure.to_html(full_html=False, include_plotlyjs=False, div_id=chart, default_height="380px")}</section>'
        for chart, figure in figures.items())
    return [
        _summary_table(names, stats, threshold),
        charts_html,
        *(_set_section(name, directory, tokenizer, threshold, examples, top_tokens)
          for name, directory, tokenizer in zip(names, scored_dirs, tokenizers)),
    ]


def write_report(scored_dirs: list[Path], output: Path, tokenizers: list, **options) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for directory in scored_dirs:
        refuse_overlap(directory, output)
    write_atomic(output, build_report(scored_dirs, tokenizers, **options).encode("utf-8"))
    return output


def _name(directory: Path) -> str:
    directory = Path(directory).resolve()
    return f"{directory.parent.name}/{directory.name}"


def _summary_table(names, stats, threshold: float) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{s.examples:,}</td><td>{s.target_tokens:,}</td><td>{s.token_ppl:.3f}</td>"
        f"<td>{s.token_ppl_quantiles[0.5]:.3f}</td><td>{s.response_ppl_quantiles[0.5]:.3f}</td>"
        f"<td>{s.masked_ratio[threshold]:.1%}</td></tr>"
        for name, s in zip(names, stats))
    return ('<section><h2>Scored sets</h2><table id="summary"><tr><th>set</th><th>examples</th><th>target tokens</th>'
            '<th>token ppl (exp mean NLL)</th><th>median token ppl</th><th>median response ppl</th>'
            f'<th>masked at τ = {threshold:g}</th></tr>{rows}</table></section>')


def _set_section(name: str, directory: Path, tokenizer, threshold: float, examples: int, top_tokens: int) -> str:
    end_of_turn = open_scored(directory)[0].meta["targets"]["end_of_turn"]["id"]
    tokens = surprising_tokens(directory, threshold, top=top_tokens)
    token_rows = "".join(
        f"<tr><td><code>{html.escape(repr(tokenizer.decode([t])))}</code>{' (end of turn: kept)' if t == end_of_turn else ''}</td>"
        f"<td>{above:,}</td><td>{occurrences:,}</td><td>{ppl:.2f}</td></tr>"
        for t, above, occurrences, ppl in tokens.iter_rows())
    # A handful of examples spread over the set, from the most surprising response down.
    chosen = select_examples(directory, indices=spread_indices(directory, examples))
    chosen.sort(key=lambda e: -(e["ppl"] or 0))
    rendered = "\n".join(_example_html(e, token_views(e, tokenizer, threshold), threshold) for e in chosen)
    return (f"<section><h2>{html.escape(name)}</h2>"
            f"<h3>Most surprising tokens (target tokens above τ = {threshold:g})</h3>"
            f'<table class="tokens"><tr><th>token</th><th>above τ</th><th>occurrences</th><th>token ppl</th></tr>{token_rows}</table>'
            f"<h3>Examples, from the most surprising response down</h3>{rendered}</section>")


def _example_html(example: dict, views: list[TokenView], threshold: float) -> str:
    spans = []
    for view in views:
        text = html.escape(view.text)
        if not view.target:
            spans.append(f'<span class="prompt">{text}</span>')
            continue
        title = "not scored" if view.ppl is None else f"ppl {view.ppl:.2f}"
        colour = "#eee" if view.ppl is None else band_of(view.ppl, threshold).html
        tag = "s" if view.masked else "span"
        spans.append(f'<{tag} class="tok" style="background:{colour}" title="{title}">{text}</{tag}>')
    masked = sum(v.masked for v in views)
    return (f'<div class="example"><div class="meta">id {html.escape(str(example["id"]))} · index {example["index"]} · '
            f'response ppl {example["ppl"]:.3f} · {masked} of {example["n_target"]} target tokens masked</div>'
            f'<pre>{"".join(spans)}</pre></div>')


def _legend(threshold: float) -> str:
    items, lower = ['<span class="prompt">prompt / template</span>'], 1.0
    for band in bands(threshold):
        label = f"ppl &gt; {lower:g}" if math.isinf(band.upper) else f"ppl {lower:g}–{band.upper:g}"
        items.append(f'<span class="tok" style="background:{band.html}">{label}</span>')
        lower = band.upper
    items.append(f"<s>struck through</s>: masked by STM (ppl &gt; τ = {threshold:g}; the end-of-turn token is kept)")
    return " ".join(items)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<script>window.curateErrors = []; window.addEventListener("error", e => window.curateErrors.push(String(e.message)));</script>
<script>{plotly}</script>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: .5rem 0 1.5rem; }} td, th {{ border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
pre {{ white-space: pre-wrap; font-size: 13px; line-height: 1.6; background: #fafafa; padding: .6rem; border: 1px solid #eee; }}
.prompt {{ color: #999; }} .tok {{ border-radius: 2px; }} s.tok {{ text-decoration-thickness: 2px; }}
.meta {{ font-size: 13px; color: #555; }} .legend {{ font-size: 13px; margin: 1rem 0; }}
</style></head>
<body><h1>{title}</h1>
<p class="legend">{legend}</p>
{body}
</body></html>
"""
