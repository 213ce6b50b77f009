"""The experiment config is a typed model: a mistake in the file is one line naming the file and the field."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import flock_holders, run_curate
from curate.errors import CurateError
from curate.experiment import ExperimentConfig, ExperimentError
from curate.masking import DEFAULT_THRESHOLD

pytestmark = pytest.mark.fast

RECIPE = "recipes/experiment/axolotl/smollm2-135m-gsm8k.yml"
GOOD = {"train": "gsm8k", "target": "gsm8k", "eval_tasks": ["gsm8k", "arc_easy"], "recipe": RECIPE}


def _load(tmp_path, **fields):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({**GOOD, **fields}))
    return path, lambda: ExperimentConfig.load(path)


@pytest.mark.parametrize(("fields", "named"), [
    ({"epoch": 2}, "unknown field 'epoch'"),  # a typo of `epochs`: refused, not silently ignored
    ({"train_limit": "100"}, "train_limit"),  # a string where a count goes
    ({"train_limit": 0}, "train_limit"),
    ({"train_limit": 2.5}, "train_limit"),
    ({"eval_limit": {"piqa": -3}}, "eval_limit.piqa"),
    ({"seeds": []}, "seeds"),
    ({"seeds": [1, True]}, "seeds.1"),
    ({"backend": "tensorrt"}, "backend"),
    ({"top_p": 0}, "top_p"),
    ({"checkpoint": "best"}, "checkpoint"),
    ({"verify": "maths"}, "verify"),
])
def test_a_bad_field_is_one_error_naming_the_file_and_the_field(tmp_path, fields, named):
    path, load = _load(tmp_path, **fields)
    with pytest.raises(ExperimentError) as raised:
        load()
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and named in message and "\n" not in message
    assert isinstance(raised.value, CurateError)  # the command line prints it as one line


def test_a_missing_required_field_is_named(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"train": "gsm8k", "eval_tasks": ["gsm8k"]}))
    with pytest.raises(ExperimentError, match="the field 'target' is required"):
        ExperimentConfig.load(path)


def test_comma_separated_tasks_and_the_default_tau(tmp_path):
    _, load = _load(tmp_path, eval_tasks="gsm8k,arc_easy,", modes="ground-truth,stm")
    config = load()
    assert config.eval_tasks == ["gsm8k", "arc_easy"]
    assert [mode.tau for mode in config.parsed_modes()] == [None, DEFAULT_THRESHOLD]


def test_what_types_cannot_say_is_checked_too(tmp_path):
    for fields, named in (({"eval_tasks": ["arc_easy"]}, "must include the target"),
                          ({"modes": ["random-mask"]}, "needs an stm mode"),
                          ({"eval_limit": {"piqa": 10}}, "'piqa' is not among eval_tasks"),
                          ({"seeds": [1, 1]}, "names a seed twice")):
        _, load = _load(tmp_path, **fields)
        with pytest.raises(ExperimentError, match=named):
            load()


def test_a_second_experiment_in_the_same_directory_is_refused_naming_the_first(tmp_path):
    """Two runs in one directory would train into the same models and mark each other's steps."""
    path, _ = _load(tmp_path)
    out, lock = tmp_path / "out", tmp_path / "out" / ".curate.lock"
    first = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "curate"), "experiment", str(path),
                              "-o", str(out), "--axolotl", "/bin/false"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while first.poll() is None and time.monotonic() < deadline and not (lock.exists() and first.pid in flock_holders(lock)):
            pass
        assert first.poll() is None and lock.exists(), "the first run never took its lock"
        os.kill(first.pid, signal.SIGSTOP)
        assert first.pid in flock_holders(lock), "the first run never took its lock"
        second = run_curate("experiment", path, "-o", out, "--axolotl", "/bin/false", check=False)
        assert second.returncode == 1
        assert f"another curate experiment (PID {first.pid}) is running in this directory" in second.stderr
    finally:
        first.kill()
        first.wait()
