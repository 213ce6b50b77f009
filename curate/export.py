"""`export`: scored Parquet -> a training set that Axolotl reads as it is.

Each output row is pre-tokenized: `input_ids`, `attention_mask`, `labels` (the token id
where trained, -100 for prompt, template and masked tokens), plus `id`. The work streams
one scored shard at a time, so a scored set larger than memory exports fine. Rows that
would not train (no trained token left, too long, extreme perplexity) are not written;
each one goes to `<output>.dropped.jsonl` with its reason, and `<output>.stats.json`
says what the set holds.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import masking
from curate.files import lock_file
from curate.models import tokenizer_fingerprint
from curate.self_output import SelfOutputChoice, choose_self_output
from curate.settings import setting
from curate.store import StoreError, open_scored, require_tokenizer

MODES = ("ground-truth", "stm", "self-output", "random-mask")
IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and so Axolotl) leaves out of the loss
# STM masking more than this share of the target tokens: answers too short for it (a few words whose
# content is the surprising part), where STM trains mostly template tokens (README, the ARC-Easy experiment).
SHORT_ANSWER_SHARE = 0.5

TRAIN_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("attention_mask", pa.list_(pa.int8())),
        ("labels", pa.list_(pa.int32())),
    ]
)


@dataclass
class ExportOptions:
    """What to keep. For `stm`, give exactly one of threshold, mask_ratio, per_sample_ratio;
    for `random-mask` (STM's control), mask_ratio and seed."""

    mode: str = setting("mode")
    threshold: float | None = setting("threshold")  # token perplexity τ; masks ppl > τ
    mask_ratio: float | None = setting("mask_ratio")  # mask this fraction of the set's target tokens (most surprising)
    per_sample_ratio: float | None = setting("per_sample_ratio")  # ... or this fraction within each example
    max_ppl: float | None = setting("max_ppl")  # drop examples whose response perplexity (before masking) exceeds this
    max_length: int | None = setting("max_length")  # drop longer examples (Axolotl's sequence_len would drop them)
    with_id: bool = True
    on_wrong: str = setting("on_wrong")  # self-output: prompts with no verified answer are dropped, or ...
    ground_truth: Path | None = setting("ground_truth")  # ... take their ground truth from this scored directory
    keep_unfinished: bool = setting("keep_unfinished")  # self-output: may an answer cut off at --max-new-tokens be chosen
    seed: int = setting("seed")  # random-mask: which tokens are drawn

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r} (expected one of {', '.join(MODES)})")
        given = [o for o in ("threshold", "mask_ratio", "per_sample_ratio") if getattr(self, o) is not None]
        if self.mode == "random-mask":
            if given != ["mask_ratio"]:
                raise ValueError("--mode random-mask takes --mask-ratio (the share of target tokens to mask at random) "
                                 "and nothing else of STM's")
        elif self.mode != "stm" and given:
            raise ValueError(f"--{given[0].replace('_', '-')} only applies to --mode stm")
        if self.on_wrong not in ("drop", "ground-truth"):
            raise ValueError("--on-wrong is drop or ground-truth")
        if self.mode == "self-output" and self.on_wrong == "ground-truth" and self.ground_truth is None:
            raise ValueError("--on-wrong ground-truth needs --ground-truth SCORED_DIR (the scored ground-truth set)")
        if self.mode == "stm" and len(given) > 1:
            raise ValueError("give one of --threshold, --mask-ratio, --per-sample-ratio")
        if self.mode == "stm" and not given:
            self.threshold = masking.DEFAULT_THRESHOLD


@dataclass
class ExportStats:
    mode: str
    output: str
    examples_in: int = 0
    examples_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    target_tokens: int = 0  # in the examples written
    trained_tokens: int = 0
    masked_tokens: int = 0
    masked_ratio: float = 0.0
    threshold: float | None = None  # token perplexity above which tokens were masked
    mask_ratio: float | None = None
    per_sample_ratio: float | None = None
    response_ppl_before: float | None = None  # mean over examples, all target tokens
    response_ppl_after: float | None = None  # mean over examples, trained tokens only
    token_ppl_before: float | None = None  # exp(mean NLL) over all target tokens of the set
    token_ppl_after: float | None = None
    seed: int | None = None  # random-mask: the seed of the draw
    scoring_rejects: int = 0  # rows `curate score` could not use (see its rejects.jsonl)
    self_output_prompts: int | None = None  # self-output: prompts answered correctly (or unchecked) ...
    ground_truth_fallbacks: int | None = None  # ... prompts that fell back to the ground truth ...
    prompts_dropped: int | None = None  # ... and prompts with neither (each listed in .dropped.jsonl)
    tokenizer: str = ""
    model: str | None = None  # the model the set was scored with, and its fingerprint (check-recipe reads them)
    model_fingerprint: str | None = None
    warnings: list[str] = field(default_factory=list)  # what a user should know before training on the set

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


_READ_COLUMNS = ["id", "row", "input_ids", "logprobs", "target", "end_of_turn", "ppl"]  # what export reads of a scored shard


def export(scored_dir: Path, output: Path, options: ExportOptions, tokenizer) -> ExportStats:
    """Write the training set for `options` to `output` (.parquet or .jsonl)."""
    scored_dir, output = Path(scored_dir), Path(output)
    manifest, shards = open_scored(scored_dir)
    refuse_overwriting_inputs(output, [scored_dir, options.ground_truth])
    fingerprint = tokenizer_fingerprint(tokenizer)
    require_tokenizer(scored_dir, manifest, fingerprint, "export")
    stats = ExportStats(mode=options.mode, output=str(output), tokenizer=fingerprint,
                        model=manifest.meta["model"], model_fingerprint=manifest.meta.get("model_fingerprint"),
                        threshold=options.threshold, mask_ratio=options.mask_ratio, per_sample_ratio=options.per_sample_ratio,
                        scoring_rejects=sum(s["n_rejects"] for s in manifest.shards))
    cutoff, ties = (None, 0)
    if options.mode == "random-mask":
        stats.seed = options.seed
        target_tokens, maskable_tokens = _count_target_tokens(shards)
        positions, next_maskable = masking.random_positions(target_tokens, maskable_tokens, options.mask_ratio, options.seed), 0
    elif options.mask_ratio is not None:
        cutoff, ties = masking.ratio_cutoff(_all_maskable_nll(shards), options.mask_ratio)
        stats.threshold = math.exp(cutoff) if math.isfinite(cutoff) else None

    choice = choose_self_output(scored_dir, shards, options.keep_unfinished) if options.mode == "self-output" else None
    totals = _Totals()
    with _TrainingWriter(output, options.with_id) as writer:
        for shard in shards:
            batch = _Batch(pq.read_table(shard, columns=_READ_COLUMNS))
            if options.mode in ("ground-truth", "self-output"):
                keep = batch.target.copy()
            elif options.mode == "random-mask":
                keep, next_maskable = masking.positions_keep(batch.target, batch.protected, positions, next_maskable)
            elif options.threshold is not None:
                keep = masking.protect(masking.threshold_keep(batch.logprobs, batch.target, options.threshold), batch.target, batch.protected)
            elif cutoff is not None:
                keep, ties = masking.cutoff_keep(batch.logprobs, batch.target, batch.protected, cutoff, ties)
            else:
                keep = masking.per_sample_keep(batch.logprobs, batch.target, batch.protected, batch.offsets, options.per_sample_ratio)
            _write_batch(batch, keep, options, writer, totals, choice)
        if choice is not None:
            stats.self_output_prompts, stats.ground_truth_fallbacks = len(choice.chosen_sources), 0
            stats.prompts_dropped = len(choice.unanswered)
        if choice is not None and choice.unanswered and options.on_wrong == "ground-truth":
            fallbacks = _write_ground_truth(options.ground_truth, choice, fingerprint, options, writer, totals)
            stats.ground_truth_fallbacks = fallbacks
            stats.prompts_dropped = len(choice.unanswered) - fallbacks
        totals.fill(stats)
        stats.dropped = writer.dropped_counts
        if options.mode == "stm" and stats.masked_ratio > SHORT_ANSWER_SHARE:
            stats.warnings.append(short_answer_warning(stats.masked_ratio))
        writer.publish(stats.to_json() + "\n")
    return stats


def refuse_overwriting_inputs(output: Path, scored_dirs: list[Path | None]) -> None:
    """The training file and its sidecars never land on, in or around what they are made from: the
    scored directories, the inputs their runs recorded, and (for answers) what was answered."""
    from curate.store import read_manifest, refuse_overlap

    inputs, pending = [], [Path(d) for d in scored_dirs if d is not None]
    while pending:  # a scored set's input may itself be a run (generated answers) with its own input
        directory = pending.pop()
        inputs.append(directory)
        try:
            source = Path(read_manifest(directory).meta["input"]["path"])
        except (StoreError, KeyError, OSError, ValueError):
            continue
        if source.is_dir() and source not in inputs:
            pending.append(source)
        else:
            inputs.append(source)
    for written in _TrainingWriter.paths(output):
        for source in inputs:
            refuse_overlap(source, written)


def short_answer_warning(masked_ratio: float) -> str:
    return (f"STM masked {masked_ratio:.0%} of the target tokens (over {SHORT_ANSWER_SHARE:.0%}): STM is meant for long "
            "answers (code, worked solutions), where it masks 20-25%; on short answers it masks their content and "
            "trains mostly the end-of-turn token. Mask a fixed share of the most surprising tokens instead, "
            "e.g. --mask-ratio 0.2, or train on the ground truth.")


def stats_path(output: Path) -> Path:
    return output.with_name(output.name.rsplit(".", 1)[0] + ".stats.json")


def dropped_path(output: Path) -> Path:
    return output.with_name(output.name.rsplit(".", 1)[0] + ".dropped.jsonl")


class _Batch:
    """One scored shard as flat numpy token buffers plus per-example offsets."""

    def __init__(self, table: pa.Table):
        ids = table.column("input_ids").combine_chunks()
        self.table = table
        self.lengths = pc.list_value_length(ids).to_numpy()
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.input_ids = ids.flatten().to_numpy()
        self.logprobs = table.column("logprobs").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        self.target = table.column("target").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(bool)
        # The end-of-turn token, as scoring found it: never masked, or the model never learns to stop.
        self.protected = self.target & table.column("end_of_turn").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(bool)
        self.example = np.repeat(np.arange(table.num_rows), self.lengths)

    def per_example(self, token_values: np.ndarray) -> np.ndarray:
        return np.bincount(self.example, weights=token_values, minlength=self.table.num_rows)

    def training_table(self, keep: np.ndarray) -> pa.Table:
        offsets = pa.array(self.offsets.astype(np.int32))
        labels = np.where(keep, self.input_ids, IGNORE_INDEX).astype(np.int32)
        return pa.Table.from_arrays(
            [self.table.column("id").combine_chunks(),
             pa.ListArray.from_arrays(offsets, pa.array(self.input_ids.astype(np.int32))),
             pa.ListArray.from_arrays(offsets, pa.array(np.ones(self.input_ids.size, dtype=np.int8))),
             pa.ListArray.from_arrays(offsets, pa.array(labels))],
            schema=TRAIN_SCHEMA)


Reason = tuple[str, str]  # (short code for the counts, sentence for the dropped file)


def _write_batch(batch: _Batch, keep: np.ndarray, options: ExportOptions, writer: _TrainingWriter,
                 totals: _Totals, choice: SelfOutputChoice | None = None) -> int:
    """Write the examples of `batch` that pass `_row_filter`, list the others as dropped, and
    count both; returns how many were written."""
    rows_kept, reasons = _row_filter(batch, keep, options, choice)
    writer.write(batch.training_table(keep).filter(pa.array(rows_kept)))
    writer.drop(batch.table, rows_kept, reasons)
    totals.add(batch, keep, rows_kept)
    return int(rows_kept.sum())


def _row_filter(batch: _Batch, keep: np.ndarray, options: ExportOptions,
                choice: SelfOutputChoice | None = None) -> tuple[np.ndarray, list[Reason | None]]:
    """Which examples are written, and the reason for each one that is not."""
    trained = batch.per_example(keep)
    ppl = batch.table.column("ppl").to_numpy(zero_copy_only=False)
    rows = batch.table.column("row").to_pylist()
    reasons: list[Reason | None] = []
    for i in range(batch.table.num_rows):
        if choice is not None and rows[i] not in choice.chosen_rows:
            reasons.append(("not_chosen", choice.why_not(rows[i], options.on_wrong)))
        elif options.max_length is not None and batch.lengths[i] > options.max_length:
            reasons.append(("too_long", f"{batch.lengths[i]} tokens is over --max-length {options.max_length}"))
        elif options.max_ppl is not None and ppl[i] > options.max_ppl:
            reasons.append(("high_ppl", f"response perplexity {ppl[i]:.2f} is over --max-ppl {options.max_ppl}"))
        elif trained[i] == 0:
            reasons.append(("no_trained_tokens", "no trained token left (Axolotl drops rows whose labels are all -100)"))
        else:
            reasons.append(None)
    return np.array([r is None for r in reasons], dtype=bool), reasons


class _Totals:
    """Running sums for the stats, over the examples that are written (constant memory)."""

    def __init__(self):
        self.examples_in = self.examples_out = 0
        self.tokens = {"target": 0, "trained": 0}
        self.nll = {"target": 0.0, "trained": 0.0}  # summed over scored tokens
        self.scored = {"target": 0, "trained": 0}
        self.response_ppl = {"target": 0.0, "trained": 0.0}  # summed over examples
        self.responses = {"target": 0, "trained": 0}

    def add(self, batch: _Batch, keep: np.ndarray, rows_kept: np.ndarray) -> None:
        written = rows_kept[batch.example]
        scored = np.isfinite(batch.logprobs)
        nll = np.where(scored, -batch.logprobs.astype(np.float64), 0.0)
        self.examples_in += batch.table.num_rows
        self.examples_out += int(rows_kept.sum())
        for name, mask in (("target", batch.target), ("trained", keep)):
            self.tokens[name] += int((mask & written).sum())
            self.nll[name] += float(nll[mask & written & scored].sum())
            self.scored[name] += int((mask & written & scored).sum())
            with np.errstate(invalid="ignore", divide="ignore"):
                per_example = np.exp(batch.per_example(np.where(mask, nll, 0.0)) / batch.per_example(mask & scored))[rows_kept]
            per_example = per_example[np.isfinite(per_example)]
            self.response_ppl[name] += float(per_example.sum())
            self.responses[name] += per_example.size

    def fill(self, stats: ExportStats) -> None:
        stats.examples_in, stats.examples_out = self.examples_in, self.examples_out
        stats.target_tokens, stats.trained_tokens = self.tokens["target"], self.tokens["trained"]
        stats.masked_tokens = stats.target_tokens - stats.trained_tokens
        stats.masked_ratio = round(stats.masked_tokens / stats.target_tokens, 6) if stats.target_tokens else 0.0
        stats.token_ppl_before = _exp_mean(self.nll["target"], self.scored["target"])
        stats.token_ppl_after = _exp_mean(self.nll["trained"], self.scored["trained"])
        stats.response_ppl_before = _mean(self.response_ppl["target"], self.responses["target"])
        stats.response_ppl_after = _mean(self.response_ppl["trained"], self.responses["trained"])


def _exp_mean(total: float, count: int) -> float | None:
    return round(math.exp(total / count), 6) if count else None


def _mean(total: float, count: int) -> float | None:
    return round(total / count, 6) if count else None


def _write_ground_truth(scored_dir: Path, choice: SelfOutputChoice, fingerprint: str, options: ExportOptions,
                        writer: _TrainingWriter, totals: _Totals) -> int:
    """Append the ground-truth rows of the unanswered prompts (every target token trained),
    matched by source row: the ground truth must be the scored set of the input that was answered."""
    manifest, shards = open_scored(scored_dir)
    require_tokenizer(scored_dir, manifest, fingerprint, "the self-output set")
    answered = choice.generation_input
    if answered is None or manifest.meta["input"]["path"] != answered["path"]:
        raise StoreError(f"--ground-truth {scored_dir} was scored from {manifest.meta['input']['path']}, but the answers "
                         f"were generated from {answered['path'] if answered else 'an input that cannot be found'}: "
                         "rows only match between the same input")
    wanted = pa.array(sorted(choice.unanswered), pa.int64())
    written, found = 0, set()
    for shard in shards:
        table = pq.read_table(shard, columns=_READ_COLUMNS)
        table = table.filter(pc.is_in(table.column("row"), wanted))
        if table.num_rows:
            found.update(table.column("row").to_pylist())
            batch = _Batch(table)
            written += _write_batch(batch, batch.target, options, writer, totals)
    for source in sorted(set(choice.unanswered) - found):
        writer.drop_prompt(source, f"no verified answer, and row {source} is not in the ground-truth set {scored_dir} "
                                   "(rejected when it was scored?)")
    return written


def _count_target_tokens(shards: list[Path]) -> tuple[int, int]:
    """Target tokens of the set, and how many of them may be masked (all but end-of-turn)."""
    target = maskable = 0
    for shard in shards:  # the two boolean columns only, not the token ids and log-probabilities
        table = pq.read_table(shard, columns=["target", "end_of_turn"])
        is_target, end_of_turn = (table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(bool)
                                  for name in ("target", "end_of_turn"))
        target += int(is_target.sum())
        maskable += int((is_target & ~end_of_turn).sum())
    return target, maskable


def _all_maskable_nll(shards: list[Path]) -> np.ndarray:
    """NLL of every maskable target token of the set (one float32 each), for --mask-ratio."""
    parts = []
    for shard in shards:
        batch = _Batch(pq.read_table(shard, columns=["id", "input_ids", "logprobs", "target", "end_of_turn"]))
        parts.append(-batch.logprobs[batch.target & ~batch.protected].astype(np.float32))
    return np.concatenate(parts).astype(np.float64) if parts else np.empty(0)


class _TrainingWriter:
    """Streams training rows to .parquet or .jsonl, and the dropped rows beside them, all under
    temporary names; `publish` renames the set into place, so a killed export leaves the
    previous set whole, and two exports to one file never mix their rows (the second is refused)."""

    def __init__(self, output: Path, with_id: bool):
        suffix = output.suffix.lower()
        if suffix not in (".parquet", ".jsonl"):
            raise ValueError(f"{output}: the training file must end in .parquet or .jsonl")
        self.output, self.with_id, self.suffix = output, with_id, suffix
        self.final = self.paths(output)
        self.partials = [path.with_name(path.name + ".partial") for path in self.final]
        self.partial = self.partials[0]
        self.dropped_counts: dict[str, int] = {}

    @staticmethod
    def paths(output: Path) -> list[Path]:
        """The files an export writes: the training file, then its dropped rows and its stats."""
        return [output, dropped_path(output), stats_path(output)]

    def __enter__(self):
        self.output.parent.mkdir(parents=True, exist_ok=True)
        # Held on the training file's temporary name until the set is published or discarded: a second
        # export to the same file is refused instead of writing into this one's files.
        self.lock = lock_file(self.partial, wait=False)
        if self.lock is None:
            raise StoreError(f"{self.output} is being written by another curate export; wait for it to finish, "
                             "or write to another file")
        self.parquet = self.jsonl = self.dropped = None
        try:
            schema = TRAIN_SCHEMA if self.with_id else TRAIN_SCHEMA.remove(0)
            self.parquet = pq.ParquetWriter(self.partial, schema, compression="zstd") if self.suffix == ".parquet" else None
            self.jsonl = open(self.partial, "w") if self.suffix == ".jsonl" else None
            self.dropped = open(self.partials[1], "w")
        except BaseException:  # __exit__ does not run when __enter__ fails: close what opened, release the lock
            self.__exit__(None, True, None)
            raise
        return self

    def write(self, table: pa.Table) -> None:
        if not self.with_id:
            table = table.drop_columns(["id"])
        if self.parquet:
            self.parquet.write_table(table)
        else:
            for record in table.to_pylist():
                self.jsonl.write(json.dumps(record) + "\n")

    def drop_prompt(self, source_row: int, sentence: str) -> None:
        self.dropped.write(json.dumps({"source_row": source_row, "reason": sentence}) + "\n")
        self.dropped_counts["no_ground_truth"] = self.dropped_counts.get("no_ground_truth", 0) + 1

    def drop(self, scored: pa.Table, rows_kept: np.ndarray, reasons: list[Reason | None]) -> None:
        ids, rows = scored.column("id").to_pylist(), scored.column("row").to_pylist()
        for i in np.flatnonzero(~rows_kept):
            code, sentence = reasons[i]
            self.dropped.write(json.dumps({"id": ids[i], "row": rows[i], "reason": sentence}) + "\n")
            self.dropped_counts[code] = self.dropped_counts.get(code, 0) + 1

    def __exit__(self, kind, error, trace):
        self._close()
        if error is not None:
            self.discard()
        self.lock.close()

    def _close(self) -> None:
        for handle in (self.parquet, self.jsonl, self.dropped):
            if handle is not None:
                handle.close()

    def publish(self, stats_json: str) -> None:
        """Sync the three files and rename them into place, the training file last."""
        try:
            self._close()
            self.partials[2].write_text(stats_json)
            for partial in self.partials:
                with open(partial, "rb") as handle:
                    os.fsync(handle.fileno())
            for partial, final in reversed(list(zip(self.partials, self.final))):
                os.replace(partial, final)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        for partial in self.partials:
            partial.unlink(missing_ok=True)
