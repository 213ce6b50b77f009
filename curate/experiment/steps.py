"""Run-once steps: each finished step leaves a done marker `steps/<name>.json` holding its options
(`curate.files.write_marker`), so a rerun skips it, and refuses, naming the option, a step that
was finished with other options. A step stopped part way is finished, not redone: scoring and
generating run with `--resume` (which refuses other options), an evaluation resumes by itself; only
a fine-tune starts again. Model work runs in subprocesses (`run_command`), so no two engines ever
share a process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from curate.experiment.config import ExperimentError
from curate.files import read_marker, write_marker


class Steps:
    """The steps of one experiment directory."""

    def __init__(self, root: Path, log: Callable[[str], None]):
        self.root, self.log, self.count = Path(root), log, 0

    def marker(self, name: str) -> Path:
        return self.root / "steps" / f"{name.replace('/', '--')}.json"

    def run(self, name: str, options: dict, action: Callable[[], None]) -> bool:
        """Run `action` unless the step finished before with these options; True if it ran."""
        import json

        self.count += 1
        marker = self.marker(name)
        options = json.loads(json.dumps(options, default=str))
        done = read_marker(marker)
        if done is not None:
            changed = [k for k in sorted(set(done["options"]) | set(options)) if done["options"].get(k) != options.get(k)]
            if changed:
                key = changed[0]
                raise ExperimentError(
                    f"{self.root}: the step {name} was finished with {key}={done['options'].get(key)!r}, this run asks "
                    f"for {key}={options.get(key)!r}; use another output directory, or delete {marker} to redo the step")
            self.log(f"[{self.count}] {name}: done before, skipped")
            return False
        self.log(f"[{self.count}] {name} ...")
        started = time.monotonic()
        action()
        seconds = round(time.monotonic() - started, 1)
        write_marker(marker, {"step": name, "options": options, "seconds": seconds})
        self.log(f"[{self.count}] {name}: done in {seconds:.0f} s")
        return True


def step_times(output: Path) -> dict[str, float]:
    """Seconds each finished step took, in the order the steps finished (their markers)."""
    markers = sorted((Path(output) / "steps").glob("*.json"), key=lambda path: path.stat().st_mtime)
    times = {}
    for marker in markers:
        done = read_marker(marker)
        if done is not None:
            times[done["step"]] = done.get("seconds")
    return times


def run_command(command: list, log_file: Path, env: dict | None = None) -> None:
    """One step's subprocess, its output kept in `log_file`; a failure shows the log's tail."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(map(str, command))}\n")
        log.flush()
        result = subprocess.run(list(map(str, command)), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    if result.returncode != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise ExperimentError(f"`{' '.join(map(str, command[:3]))} ...` failed ({result.returncode}); "
                              f"its output is in {log_file}:\n{tail}")


def curate_command(*args) -> list[str]:
    return [sys.executable, "-m", "curate", *map(str, args)]
