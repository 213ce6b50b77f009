"""The `curate report` section of a `curate experiment` directory: its table, and bar charts of
TI/BWT, of the absolute change per task and of the gold-answer NLL change per task, each bar with
its 95% interval, so that a reader sees at once which differences between modes are larger than
the noise; with seeds, each mode's mean, spread across seeds and interval side by side; and what
STM masked on the training set (the kinds of tokens, the most often masked ones)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from curate.experiment import CONFIG, TABLE_JSON
from curate.experiment.table import SUMMARY_CAPTION, arm_summary, several_seeds

CHARTS = ("experiment-forgetting", "experiment-changes", "experiment-nll")  # element ids, checked by the tests


def is_experiment(directory: Path) -> bool:
    return (Path(directory) / CONFIG).is_file()


def experiment_section(directory: Path) -> str:
    import plotly.graph_objects as go

    path = Path(directory) / TABLE_JSON
    if not path.is_file():
        raise ValueError(f"{directory}: no {TABLE_JSON} yet: finish the experiment first (`curate experiment` resumes it)")
    table = json.loads(path.read_text())
    target, modes, tasks = table["target"], table["modes"], table["tasks"]
    labels = list(modes)

    forgetting = go.Figure()
    for metric, name in (("ti", f"TI ({target})"), ("bwt", "BWT (other tasks)")):
        values = [modes[m][metric] for m in labels]
        low_high = [modes[m][f"{metric}_interval"] for m in labels]
        forgetting.add_trace(go.Bar(x=labels, y=values, name=name, error_y=_error_bars(values, low_high)))
    forgetting.update_layout(title="relative change against the base model (TI on the target, BWT the mean elsewhere)",
                             yaxis_tickformat=".0%", barmode="group")
    changes = go.Figure()
    for task in tasks:
        values = [modes[m]["absolute"][task]["change"] for m in labels]
        low_high = [modes[m]["absolute"][task]["interval"] for m in labels]
        changes.add_trace(go.Bar(x=labels, y=values, name=f"{task} (target)" if task == target else task,
                                 error_y=_error_bars(values, low_high)))
    changes.update_layout(title="absolute change of each task's score (fine-tuned − base)", barmode="group")
    nll = go.Figure()
    for task in tasks:
        cells = [modes[m].get("nll_change", {}).get(task, {"change": math.nan, "interval": (math.nan, math.nan)})
                 for m in labels]
        values = [c["change"] for c in cells]
        nll.add_trace(go.Bar(x=labels, y=values, name=f"{task} (target)" if task == target else task,
                             error_y=_error_bars(values, [c["interval"] for c in cells])))
    nll.update_layout(title="change of each task's gold-answer NLL per token (fine-tuned − base; below 0: likelier)",
                      barmode="group")
    charts = "\n".join(
        f'<div class="chart">{figure.to_html(full_html=False, include_plotlyjs=False, div_id=chart, default_height="380px")}</div>'
        for chart, figure in zip(CHARTS, (forgetting, changes, nll)))
    partial = table.get("partial")
    banner = (f"<p><strong>Partial: {partial['runs_done']} of {partial['runs']} runs trained and evaluated so far"
              f"</strong> (next: {html.escape(partial['next'])}; <code>curate experiment</code> with the same config and "
              "output resumes). Arms with fewer seeds than configured show those seeds only.</p>" if partial else "")
    return (f"<section><h2>Experiment {html.escape(str(Path(directory).resolve().name))}: trained for "
            f"{html.escape(target)}</h2>{banner}{_summary_table(table)}{_scores_table(table)}{_modes_table(table)}{_arms_table(table)}"
            f"{charts}{_diagnostics_table(table)}{_heldout_table(table)}</section>")


def _error_bars(values: list[float], intervals: list) -> dict:
    plus = [high - v if math.isfinite(high) and math.isfinite(v) else 0 for v, (low, high) in zip(values, intervals)]
    minus = [v - low if math.isfinite(low) and math.isfinite(v) else 0 for v, (low, high) in zip(values, intervals)]
    return {"type": "data", "symmetric": False, "array": plus, "arrayminus": minus}


def _cell(value, interval, number: str) -> str:
    if value is None or not math.isfinite(value) or interval is None:
        return "<td>n/a</td>"
    low, high = interval
    return f"<td>{number.format(value)} <small>[{number.format(low)}, {number.format(high)}]</small></td>"


def _summary_table(table: dict) -> str:
    """One row per arm: the outcome as README states it (`arm_summary`)."""
    if not table.get("arms"):
        return ""
    header, rows = arm_summary(table)
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return (f'<h3>Outcome per arm</h3><p>{html.escape(SUMMARY_CAPTION)}</p>'
            f'<table id="experiment-summary"><tr>{head}</tr>{body}</table>')


def _scores_table(table: dict) -> str:
    tasks = table["tasks"]
    head = "".join(f"<th>{html.escape(t)}{' (target)' if t == table['target'] else ''}</th>" for t in tasks)
    rows = "".join(f"<tr><td>{html.escape(label)}</td>"
                   + "".join(_cell(scores[t]["score"], scores[t]["interval"], "{:.3f}") for t in tasks) + "</tr>"
                   for label, scores in table["scores"].items())
    return f'<h3>Scores (95% bootstrap intervals)</h3><table id="experiment-scores"><tr><th>model</th>{head}</tr>{rows}</table>'


def _modes_table(table: dict) -> str:
    tasks = table["tasks"]
    head = "".join(f"<th>Δ {html.escape(t)}</th>" for t in tasks)
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{row['examples']}</td><td>{row['masked_ratio']:.1%}</td>"
        + _cell(row["ti"], row["ti_interval"], "{:+.1%}") + _cell(row["bwt"], row["bwt_interval"], "{:+.1%}")
        + _cell(row.get("ti_nll"), row.get("ti_nll_interval"), "{:+.1%}")
        + _cell(row.get("bwt_nll"), row.get("bwt_nll_interval"), "{:+.1%}")
        + "".join(_cell(row["absolute"][t]["change"], row["absolute"][t]["interval"], "{:+.3f}") for t in tasks) + "</tr>"
        for label, row in table["modes"].items())
    return ('<h3>Forgetting per mode (paired bootstrap intervals)</h3><table id="experiment-modes"><tr><th>mode</th>'
            "<th>trained examples</th><th>masked</th><th>TI</th><th>BWT</th><th>TI gold NLL</th><th>BWT gold NLL</th>"
            f"{head}</tr>{rows}</table>")


def _arms_table(table: dict) -> str:
    """Per mode trained with several seeds: mean over seeds, spread (sd) across them, bootstrap interval."""
    if not several_seeds(table):
        return ""
    names = {"ti": f"TI ({table['target']})", "bwt": "BWT", "ti_nll": "TI gold NLL", "bwt_nll": "BWT gold NLL"}
    rows = []
    for arm, row in table["arms"].items():
        for metric, name in names.items():
            cell = row[metric]
            per_seed = ", ".join(_signed(v) for v in cell["per_seed"])
            rows.append(f"<tr><td>{html.escape(arm)}</td><td>{len(row['runs'])}</td><td>{html.escape(name)}</td>"
                        f"<td>{_signed(cell['mean'])}</td><td>{_plain(cell['sd'])}</td><td>{per_seed}</td>"
                        f"<td>[{_signed(cell['interval'][0])}, {_signed(cell['interval'][1])}]</td></tr>")
    return ('<h3>Over seeds: mean, spread across seeds, bootstrap interval</h3><table id="experiment-seeds"><tr>'
            "<th>mode</th><th>seeds</th><th>metric</th><th>mean</th><th>spread (sd)</th><th>per seed</th>"
            f"<th>95% interval of the mean</th></tr>{''.join(rows)}</table>")


def _diagnostics_table(table: dict) -> str:
    """What each masking mode masked on the training set."""
    from curate.experiment import CATEGORIES

    found = table.get("diagnostics") or {}
    if not found:
        return ""
    head = "".join(f"<th>{kind}</th>" for kind in CATEGORIES)
    rows = []
    for label, d in found.items():
        shares = "".join(f"<td>{d['masked_share'][k]:.0%} <small>({d['target_share'][k]:.0%} of target; "
                         f"{d['masked_rate'][k]:.0%} masked)</small></td>" for k in CATEGORIES)
        common = ", ".join(f"<code>{html.escape(repr(item['token']))}</code> {item['masked']} "
                           f"<small>({item['rate']:.0%})</small>" for item in d["top"])
        rows.append(f"<tr><td>{html.escape(label)}</td><td>{d['masked_tokens']:,} of {d['target_tokens']:,}</td>"
                    f"{shares}<td>{common}</td></tr>")
    return ("<h3>What was masked on the training set</h3><p>Share of the masked tokens of each kind (in brackets: "
            "the kind's share of all target tokens, and the share of that kind masked). <em>calculator</em>: inside "
            "a <code>&lt;&lt;48/2=24&gt;&gt;</code> annotation; <em>number</em>: a digit outside one; <em>formatting</em>: "
            "whitespace, punctuation, symbols.</p>"
            f'<table id="experiment-masked"><tr><th>training set</th><th>masked</th>{head}<th>most often masked '
            f"(share of its occurrences masked)</th></tr>{''.join(rows)}</table>")


def _heldout_table(table: dict) -> str:
    """The target's held-out gold NLL, split by the base model's token perplexity at τ."""
    from curate.experiment.diagnostics import HELDOUT_PARTS, heldout_cell

    split = table.get("heldout_nll")
    if not split:
        return ""
    rows = []
    for label in split["nll"]:
        cells = "".join(f"<td>{value}" + (f" <small>({change})</small>" if change else "") + "</td>"
                        for value, change in (heldout_cell(split, label, part) for part in HELDOUT_PARTS))
        rows.append(f"<tr><td>{html.escape(label)}</td>{cells}</tr>")
    share = split["surprising_share"]
    return (f"<h3>Held-out {html.escape(table['target'])} gold answers, token by token</h3><p>Mean NLL per token over "
            f"{split['rows']} held-out answers ({split['tokens']:,} tokens), split by the base model's token perplexity "
            f"at τ = {split['tau']:g}: the tokens STM at τ masks on training rows, and the rest. In brackets: the change "
            "against the base model.</p>"
            f'<table id="experiment-heldout"><tr><th>model</th><th>all tokens</th><th>base ppl ≤ τ ({1 - share:.0%})</th>'
            f"<th>base ppl &gt; τ ({share:.0%})</th></tr>{''.join(rows)}</table>")


def _signed(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.1%}"


def _plain(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.1%}"
