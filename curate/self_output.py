"""Self-output's choice: which of the model's own answers each prompt trains on (the study's rule:
the verified answer of lowest perplexity), and why the others do not."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from curate.store import StoreError


@dataclass
class SelfOutputChoice:
    """Which generated answer each prompt trains on. Prompts are the source rows of the
    generation input (two prompts may share an id); scored rows are positions in the scored set."""

    chosen_rows: set[int]  # scored rows to train on, one per answered prompt
    chosen_sources: set[int]
    source_of: dict[int, int]  # scored row -> source row
    unanswered: dict[int, str]  # source row -> why no answer of it was chosen
    generation_input: dict | None  # the fingerprint of the input that was answered (rows refer to it)

    def why_not(self, row: int, on_wrong: str) -> str:
        """Why the answer at scored row `row` does not train (export's rejects say it)."""
        source = self.source_of[row]
        if source in self.chosen_sources:
            return "another answer to this prompt was chosen"
        fallback = ": its ground truth is used instead" if on_wrong == "ground-truth" else ""
        return self.unanswered[source] + fallback


def choose_self_output(scored_dir: Path, shards: list[Path], keep_unfinished: bool) -> SelfOutputChoice:
    """As the paper chooses: per prompt, among its finished, verified answers (or unchecked
    ones, where no checker applies) the one of lowest response perplexity. An answer cut off
    at --max-new-tokens is never chosen unless `keep_unfinished`: repetition loops have very
    low perplexity and would win, and would teach the model to stop mid-answer."""
    import polars as pl

    carried = pl.col("extra").str.json_path_match  # the generated row's columns, carried through scoring
    answers = pl.scan_parquet([str(s) for s in shards]).select(
        "row", "ppl", carried("$.verified").alias("verified"), carried("$.verify_reason").alias("reason"),
        carried("$.finished").alias("finished"), carried("$.row").cast(pl.Int64).alias("source")).collect()
    if answers.height and (answers["reason"].is_null().all() or answers["source"].is_null().any()):
        raise StoreError("these scored rows carry no generation verdicts: score the output of `curate generate` for self-output")
    checked = pl.col("verified").is_null() | (pl.col("verified") == "true")
    finished = pl.lit(True) if keep_unfinished else pl.col("finished") == "true"
    best = answers.filter(checked & finished).sort("ppl", nulls_last=True).group_by("source", maintain_order=True).first()
    chosen = dict(zip(best["source"].to_list(), best["row"].to_list()))
    unanswered = {}
    for source, group in answers.filter(~pl.col("source").is_in(list(chosen))).group_by("source"):
        verified_but_cut = group.filter(checked & (pl.col("finished") != "true")).height
        unanswered[source[0]] = ("only answers cut off at --max-new-tokens were verified (--keep-unfinished allows them)"
                                 if verified_but_cut else "no verified answer to this prompt")
    return SelfOutputChoice(chosen_rows=set(chosen.values()), chosen_sources=set(chosen),
                            source_of=dict(zip(answers["row"].to_list(), answers["source"].to_list())),
                            unanswered=unanswered, generation_input=_generation_input(scored_dir))


def _generation_input(scored_dir: Path) -> dict | None:
    """The input `curate generate` answered, found through the scored set's own input."""
    from curate.store import read_manifest

    generated = Path(read_manifest(scored_dir).meta["input"]["path"])
    try:
        return read_manifest(generated).meta["input"]
    except (StoreError, FileNotFoundError, KeyError):
        return None
