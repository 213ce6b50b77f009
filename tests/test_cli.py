"""The command line's option table and its boundary: each option name is defined once, a default the
library owns (τ) is the library's constant, and only `curate/cli.py` speaks click."""

import ast
import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import curate
from curate import masking, stats
from curate.cli import main
from curate.export import ExportOptions
from curate.models import ModelError, resolve_model
from curate.settings import SETTINGS

pytestmark = pytest.mark.fast

PACKAGE = Path(curate.__file__).parent

# Options whose meaning is, by nature, each command's own: what that command writes, or prints as JSON.
PER_COMMAND = {"--output", "--json"}


def commands(group: click.Group = main, prefix: str = ""):
    """(`curate` command line, command) for every command, subcommands of groups included."""
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def definitions() -> dict[str, dict[str, tuple]]:
    """option name -> {command: (default, help, type, is_flag)}."""
    table: dict[str, dict[str, tuple]] = {}
    for name, command in commands():
        for option in command.params:
            if isinstance(option, click.Option):
                kind = json.dumps(option.type.to_info_dict(), sort_keys=True, default=str)
                definition = (repr(option.default), option.help, kind, option.is_flag)
                table.setdefault(option.opts[-1], {})[name] = definition
    return table


def test_each_option_name_has_one_definition():
    defined_differently = {
        name: uses for name, uses in definitions().items() if len(set(uses.values())) > 1 and name not in PER_COMMAND
    }
    assert not defined_differently, f"defined again with another default or help: {sorted(defined_differently)}"


def test_every_setting_is_an_option_of_some_command_with_its_help():
    """The settings table is the options' one source: each entry reaches the command line, as written there."""
    used = {}
    for _, command in commands():
        for option in command.params:
            if isinstance(option, click.Option) and option.name in SETTINGS:
                used[option.name] = option
    assert set(used) == set(SETTINGS), f"settings no command offers: {sorted(set(SETTINGS) - set(used))}"
    for name, option in used.items():
        assert option.help == SETTINGS[name].help and option.opts[-1] == f"--{name.replace('_', '-')}", name


def test_every_threshold_defaults_to_the_papers_tau():
    tau = masking.DEFAULT_THRESHOLD
    thresholds = {
        name: option for name, command in commands() for option in command.params if option.name == "threshold"
    }
    assert thresholds
    for command, option in thresholds.items():
        if option.default is None:  # left to the library, and the help says what it picks
            assert ExportOptions(mode="stm").threshold == tau
            assert f"[default: {tau}," in option.help, command
        else:
            assert option.default == tau, command
    assert tau in stats.THRESHOLDS  # `curate stats` has the paper's row, and compares sets at τ


def test_the_command_line_writes_no_copy_of_tau():
    tau = masking.DEFAULT_THRESHOLD
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    as_text = re.compile(rf"(?<![\d.]){re.escape(str(tau))}(?![\d])")
    copies = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and (
            node.value == tau
            if isinstance(node.value, float)
            else isinstance(node.value, str) and as_text.search(node.value)
        )
    ]
    assert copies == [], f"cli.py lines {copies}: use masking.DEFAULT_THRESHOLD"


def test_no_module_but_the_command_line_imports_click():
    importers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if any(name == "click" or name.startswith("click.") for name in names):
                importers.append(str(path.relative_to(PACKAGE)))
    assert sorted(set(importers)) == ["cli.py"]


def test_a_model_curate_cannot_use_is_the_librarys_error_and_a_bad_model_option(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model(str(tmp_path))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}\n')
    result = CliRunner().invoke(main, ["preview", str(rows), "--model", "no-such/model"], prog_name="curate")
    assert result.exit_code == 2, result.output
    assert "Invalid value for --model: no-such/model: no such directory, and HF_HUB_OFFLINE=1" in result.output
    assert "Try 'curate preview --help'" in result.output


def test_a_library_error_is_one_line_without_a_traceback():
    result = CliRunner().invoke(main, ["benchmarks", "pull", "gsm9k"])
    assert result.exit_code == 1
    assert (
        result.output.startswith("Error: unknown benchmark 'gsm9k'; known: gsm8k") and "Traceback" not in result.output
    )
