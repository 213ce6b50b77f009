"""The `curate report` section of a `curate experiment` directory: its table, and bar charts of
TI/BWT and of the absolute change per task, each bar with its 95% interval, so that a reader
sees at once which differences between modes are larger than the noise."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from curate.experiment import CONFIG, TABLE_JSON

CHARTS = ("experiment-forgetting", "experiment-changes")  # element ids, checked by the tests


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
    charts = "\n".join(
        f'<div class="chart">{figure.to_html(full_html=False, include_plotlyjs=False, div_id=chart, default_height="380px")}</div>'
        for chart, figure in zip(CHARTS, (forgetting, changes)))
    return (f"<section><h2>Experiment {html.escape(str(Path(directory).resolve().name))}: trained for "
            f"{html.escape(target)}</h2>{_scores_table(table)}{_modes_table(table)}{charts}</section>")


def _error_bars(values: list[float], intervals: list) -> dict:
    plus = [high - v if math.isfinite(high) and math.isfinite(v) else 0 for v, (low, high) in zip(values, intervals)]
    minus = [v - low if math.isfinite(low) and math.isfinite(v) else 0 for v, (low, high) in zip(values, intervals)]
    return {"type": "data", "symmetric": False, "array": plus, "arrayminus": minus}


def _cell(value, interval, number: str) -> str:
    if value is None or not math.isfinite(value):
        return "<td>n/a</td>"
    low, high = interval
    return f"<td>{number.format(value)} <small>[{number.format(low)}, {number.format(high)}]</small></td>"


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
        + "".join(_cell(row["absolute"][t]["change"], row["absolute"][t]["interval"], "{:+.3f}") for t in tasks) + "</tr>"
        for label, row in table["modes"].items())
    return ('<h3>Forgetting per mode (paired bootstrap intervals)</h3><table id="experiment-modes"><tr><th>mode</th>'
            f"<th>trained examples</th><th>masked</th><th>TI</th><th>BWT</th>{head}</tr>{rows}</table>")
