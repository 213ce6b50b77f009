"""Every setting a user can give, defined once: its name, type, default and help.

The library's typed settings (`EngineSettings`, `SamplingOptions`, `Fields`, `RunOptions`,
`ExportOptions`) declare their fields with `setting(name)`, so their defaults are these; the
command line generates its options from the same table (`curate.cli`), as vLLM does from its
`EngineArgs`. A name has one meaning wherever it appears: where commands need different values,
the default is None and the help says what each one picks. No click here: the library stays
usable without its command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from curate.masking import DEFAULT_THRESHOLD

DEFAULT_MAX_LENGTH = 4096  # tokens per example when --max-length is not given (at most the model's context)


@dataclass(frozen=True)
class Setting:
    """One user-facing setting. `kind`: int, float, str, bool (a flag), choice or path."""

    help: str
    default: Any = None
    kind: str = "str"
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    min_open: bool = False  # the minimum itself is not allowed
    metavar: str | None = None


SETTINGS: dict[str, Setting] = {
    # ---- which model, and how the engine runs it (EngineSettings)
    "model": Setting(
        "The model: a Hugging Face model directory (or hub id when online) [default: the bundled "
        "SmolLM2-135M-Instruct; for a scored set, the model its manifest names].",
        metavar="DIR",
    ),
    "backend": Setting("auto: vllm where installed, else hf (transformers).", "auto", "choice", ("auto", "vllm", "hf")),
    "dtype": Setting(
        "auto: float32 on CPU, bfloat16 on GPU.", "auto", "choice", ("auto", "float32", "bfloat16", "float16")
    ),
    "tensor_parallel_size": Setting(
        "vLLM: GPUs one engine spans (a model too large for one GPU).", 1, "int", minimum=1
    ),
    "gpu_memory_utilization": Setting(
        "vLLM: share of each GPU's memory the engine may take [default: vLLM's, 0.9].",
        None,
        "float",
        minimum=0,
        maximum=1,
        min_open=True,
    ),
    "max_num_seqs": Setting("Sequences per engine step [default: vLLM's; hf generation: 16].", None, "int", minimum=1),
    "max_num_batched_tokens": Setting(
        "Tokens per engine step [default: as many as keep the prompt-logprob logits under "
        "4 GiB for the model's vocabulary, 512-16384; hf: 8192].",
        None,
        "int",
        minimum=1,
    ),
    # ---- how rows become tokens (ChatTokenizer)
    "max_length": Setting(
        f"Longest example (prompt + answer) in tokens. score: longer ones are rejected unless --truncate; "
        f"generate: prompt + --max-new-tokens must fit; export: longer ones are dropped (set it to "
        f"Axolotl's sequence_len) [default: {DEFAULT_MAX_LENGTH}, at most the model's context; "
        f"export: no limit].",
        None,
        "int",
        minimum=2,
    ),
    "truncate": Setting(
        "Keep the first --max-length tokens of over-long examples (marked `truncated`).", False, "bool"
    ),
    "system_prompt": Setting(
        "keep: pass system messages to the template; merge: fold them into the first user turn (for "
        "templates without a system role, e.g. Gemma-2); drop: remove them.",
        "keep",
        "choice",
        ("keep", "merge", "drop"),
    ),
    "train_turns": Setting(
        "Which assistant turns are targets; the others stay context. A message's `weight: 0` also keeps it out.",
        "all",
        "choice",
        ("all", "last"),
    ),
    "reasoning": Setting(
        "Reasoning traces (`<think>…</think>` opening an answer, or a `reasoning_content`/`thinking` "
        "field): keep: trained with the answer, as the model writes them after its generation prompt; "
        "drop: answers only (an empty think block, where the template opens one, is context). Recorded "
        "in the manifest.",
        "keep",
        "choice",
        ("keep", "drop"),
    ),
    # ---- which columns hold what (Fields)
    "prompt_field": Setting("Column holding the prompt (with --response-field), instead of shape detection."),
    "response_field": Setting("Column holding the response (with --prompt-field)."),
    "reference_field": Setting("Column holding the checkable reference answer.", "reference"),
    "split": Setting(
        "Which split to read: of a directory input holding several (a DatasetDict saved to disk, a folder "
        "of train-*/test-* Parquet shards), or of each benchmark task (eval) [default: the only one; "
        "eval: test]."
    ),
    # ---- how a run reads its input and commits its output (RunOptions)
    "shard_rows": Setting(
        "Input rows per Parquet shard (the unit of --resume and of work on Ray) [default: 512 for "
        "score, 128 for generate, 256 for eval's scoring and 128 for its answers].",
        None,
        "int",
        minimum=1,
    ),
    "limit": Setting(
        "Only the first N rows of the input (eval: of each task; recorded, so --resume keeps it) "
        "[default: all; preview: 3].",
        None,
        "int",
        minimum=1,
    ),
    "resume": Setting("Finish an interrupted run, keeping its completed shards.", False, "bool"),
    "overwrite": Setting("Replace an existing run in the output directory (only curate's own files).", False, "bool"),
    # ---- sampling (SamplingOptions)
    "n": Setting("Answers per prompt (the paper: 32).", 1, "int", minimum=1),
    "temperature": Setting("0 is greedy (the paper: 0.7).", 0.0, "float", minimum=0),
    "top_p": Setting("Nucleus sampling's share (the paper: 0.95).", 1.0, "float", minimum=0, maximum=1, min_open=True),
    "max_new_tokens": Setting("Longest answer generated, in tokens.", 512, "int", minimum=1),
    "seed": Setting("The seed of the command's randomness: generate's sampling, export's random-mask draw.", 0, "int"),
    "unsafe_verify": Setting(
        "Where bubblewrap cannot start, run answers' code checks without the sandbox (resource limits only).",
        False,
        "bool",
    ),
    # ---- masking (ExportOptions, and the views that mark what STM masks)
    "threshold": Setting(
        f"STM's τ: target tokens whose perplexity exp(-logprob) exceeds it are masked (report and "
        f"inspect mark them) [default: {DEFAULT_THRESHOLD}, the paper's τ].",
        None,
        "float",
        minimum=0,
        min_open=True,
    ),
    "mode": Setting(
        "stm: mask surprising target tokens; ground-truth: train on every target token; self-output: the "
        "model's own verified answers (SCORED = `curate score` of `curate generate` output); random-mask: "
        "STM's control, mask --mask-ratio of the target tokens drawn at random (--seed).",
        "stm",
        "choice",
        ("stm", "ground-truth", "self-output", "random-mask"),
    ),
    "mask_ratio": Setting(
        "STM: instead of τ, mask this fraction of all target tokens of the set, most surprising first "
        "(e.g. 0.2); random-mask: mask this fraction of the set's target tokens, drawn at random.",
        None,
        "float",
        minimum=0,
        maximum=1,
    ),
    "per_sample_ratio": Setting(
        "STM: instead of τ, mask this fraction of each example's target tokens, most surprising first.",
        None,
        "float",
        minimum=0,
        maximum=1,
    ),
    "max_ppl": Setting(
        "Drop examples whose response perplexity (before masking) exceeds this.",
        None,
        "float",
        minimum=0,
        min_open=True,
    ),
    "on_wrong": Setting(
        "self-output: what to do with prompts that have no verified answer.", "drop", "choice", ("drop", "ground-truth")
    ),
    "ground_truth": Setting(
        "self-output with --on-wrong ground-truth: the scored ground-truth directory to fall back on.", None, "dir"
    ),
    "keep_unfinished": Setting(
        "self-output: an answer cut off at --max-new-tokens may be chosen [default: never].", False, "bool"
    ),
    # ---- output
    "quiet": Setting(
        "No progress bar or summary table, and none of the engines' own warnings and logs.", False, "bool"
    ),
}


def setting(name: str, **field_options) -> Any:
    """A dataclass field that is the user-facing setting `name`: its default is the table's, and
    the command line finds it by name (`field.metadata["setting"]`)."""
    return field(default=SETTINGS[name].default, metadata={"setting": name}, **field_options)
