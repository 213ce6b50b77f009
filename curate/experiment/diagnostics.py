"""What each masking run masked on the training set: tokens by kind (numbers, GSM8K calculator
annotations, formatting, words) and the tokens masked most often, for the report to explain a
result with."""

from __future__ import annotations

import re
from pathlib import Path

CATEGORIES = ("number", "calculator", "formatting", "word")
_ANNOTATION = re.compile(r"<<[^>]*>>")


def token_categories(texts: list[str]) -> list[str]:
    """The kind of each token of one answer, from the tokens' texts in order: `calculator` inside a
    GSM8K calculator annotation `<<48/2=24>>` (its brackets included), `number` (a digit outside
    one), `formatting` (only whitespace, punctuation or symbols: newlines, `.`, `$`, `**`), else `word`."""
    text = "".join(texts)
    spans = [match.span() for match in _ANNOTATION.finditer(text)]
    out, start = [], 0
    for piece in texts:
        end = start + len(piece)
        if piece and any(a < end and start < b for a, b in spans):
            out.append("calculator")
        elif any(c.isdigit() for c in piece):
            out.append("number")
        elif not any(c.isalnum() for c in piece):
            out.append("formatting")
        else:
            out.append("word")
        start = end
    return out


def mask_diagnostics(scored_dir: Path, export_file: Path, tokenizer, top: int = 15) -> dict:
    """Which target tokens a training set masked (labels -100 on a target token of the scored set,
    matched by id): how many, the share of masked tokens of each kind (`token_categories`) beside
    that kind's share of all target tokens, the share of each kind that was masked, and the most
    often masked tokens (with how often each of them is masked where it occurs)."""
    from collections import Counter

    import pyarrow.parquet as pq

    from curate.store import open_scored

    labels = {}
    for record in pq.read_table(export_file, columns=["id", "labels"]).to_pylist():
        labels.setdefault(record["id"], record["labels"])
    texts: dict[int, str] = {}
    kinds, masked_kinds, masked_text, seen_text = Counter(), Counter(), Counter(), Counter()
    for shard in open_scored(scored_dir)[1]:
        for record in pq.read_table(shard, columns=["id", "input_ids", "target"]).to_pylist():
            if record["id"] not in labels:
                continue
            row_labels, ids = labels.pop(record["id"]), record["input_ids"]
            positions = [i for i, is_target in enumerate(record["target"]) if is_target]
            for i in positions:
                if ids[i] not in texts:
                    texts[ids[i]] = tokenizer.decode([ids[i]])
            pieces = [texts[ids[i]] for i in positions]
            for i, piece, kind in zip(positions, pieces, token_categories(pieces)):
                kinds[kind] += 1
                seen_text[piece] += 1
                if row_labels[i] == -100:
                    masked_kinds[kind] += 1
                    masked_text[piece] += 1
    target, masked = sum(kinds.values()), sum(masked_kinds.values())
    return {"target_tokens": target, "masked_tokens": masked,
            "masked_share": {k: masked_kinds[k] / masked if masked else 0.0 for k in CATEGORIES},
            "target_share": {k: kinds[k] / target if target else 0.0 for k in CATEGORIES},
            "masked_rate": {k: masked_kinds[k] / kinds[k] if kinds[k] else 0.0 for k in CATEGORIES},
            "top": [{"token": piece, "masked": count, "rate": count / seen_text[piece]}
                    for piece, count in masked_text.most_common(top)]}


def diagnostics_markdown(diagnostics: dict) -> str:
    lines = ["What each masking run masked on the training set: the share of masked tokens of each kind "
             "(beside that kind's share of all target tokens), and the tokens masked most often "
             "(with the share of their occurrences masked):", "",
             "| training set | masked | " + " | ".join(CATEGORIES) + " | most often masked |",
             "|---|---|" + "---|" * len(CATEGORIES) + "---|"]
    for label, found in diagnostics.items():
        shares = [f"{found['masked_share'][k]:.0%} ({found['target_share'][k]:.0%})" for k in CATEGORIES]
        common = ", ".join(f"`{_shown(item['token'])}` {item['masked']} ({item['rate']:.0%})" for item in found["top"][:8])
        lines.append(f"| {label} | {found['masked_tokens']:,} of {found['target_tokens']:,} | " + " | ".join(shares)
                     + f" | {common} |")
    return "\n".join(lines)


def _shown(piece: str) -> str:
    return piece.replace("\n", "\\n").replace("|", "\\|").replace("`", "'") or "(empty)"


def heldout_nll_split(base_dir: Path, runs: dict[str, Path], tau: float) -> dict:
    """The target task's held-out gold answers scored token by token (`curate score`) under the base
    model and each run: the mean NLL over all their target tokens, over the tokens the base model
    finds surprising (token perplexity > `tau`: what STM at `tau` would mask) and over the rest.
    It tells apart a run that learned the easy tokens but not the hard ones from one that learned
    neither. Rows are matched by id; a run whose tokens differ from the base model's is an error."""
    import numpy as np

    from curate.experiment.config import ExperimentError
    from curate.masking import threshold_keep

    base = _target_nll(base_dir)
    ids = sorted(base)
    base_nll = np.concatenate([base[i][1] for i in ids]) if ids else np.zeros(0)
    surprising = ~threshold_keep(-base_nll, np.ones(base_nll.size, dtype=bool), tau)  # STM's own rule

    def means(nll: np.ndarray) -> dict:
        return {name: float(part.mean()) if part.size else None
                for name, part in (("all", nll), ("kept", nll[~surprising]), ("surprising", nll[surprising]))}

    out = {"tau": tau, "rows": len(ids), "tokens": int(base_nll.size),
           "surprising_share": float(surprising.mean()) if ids else 0.0, "nll": {"base": means(base_nll)}}
    for label, directory in runs.items():
        found = _target_nll(directory)
        for i in ids:
            if i not in found or not np.array_equal(found[i][0], base[i][0]):
                raise ExperimentError(f"{directory}: row {i} is missing or tokenized differently from {base_dir}")
        out["nll"][label] = means(np.concatenate([found[i][1] for i in ids]) if ids else np.zeros(0))
    return out


def _target_nll(scored_dir: Path) -> dict:
    """id -> (the target tokens' ids, their NLL), from a scored directory."""
    import numpy as np
    import pyarrow.parquet as pq

    from curate.store import open_scored

    out = {}
    for shard in open_scored(scored_dir)[1]:
        for record in pq.read_table(shard, columns=["id", "input_ids", "logprobs", "target"]).to_pylist():
            target = np.asarray(record["target"], dtype=bool)
            out[record["id"]] = (np.asarray(record["input_ids"])[target],
                                 -np.asarray(record["logprobs"], dtype=np.float64)[target])
    return out


HELDOUT_PARTS = ("all", "kept", "surprising")


def heldout_cell(split: dict, label: str, part: str) -> tuple[str, str]:
    """One cell of the held-out split: the mean NLL, and its change against the base model ('' for the base)."""
    value, base = split["nll"][label][part], split["nll"]["base"][part]
    if value is None:
        return "n/a", ""
    return f"{value:.3f}", ("" if label == "base" or not base else f"{(value - base) / base:+.0%}")


def heldout_markdown(split: dict, target: str) -> str:
    share = split["surprising_share"]
    lines = [f"{target}'s held-out gold answers token by token ({split['rows']} rows, {split['tokens']:,} tokens): "
             "mean NLL per token (pooled over the answers) over all tokens, over those the base model finds "
             f"surprising (token perplexity > τ = {split['tau']:g}, what STM at τ masks on training rows) and over "
             "the rest; in brackets the change against the base model:", "",
             f"| model | all tokens | base ppl ≤ τ ({1 - share:.0%}) | base ppl > τ ({share:.0%}) |", "|---|---|---|---|"]
    for label in split["nll"]:
        cells = [value + (f" ({change})" if change else "")
                 for value, change in (heldout_cell(split, label, part) for part in HELDOUT_PARTS)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
