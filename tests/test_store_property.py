"""A seeded random walk of start / kill -9 / resume / overwrite / two-at-once on one output
directory, with real `curate score` processes and the real model. After every step: a finished
run holds every row of its own input exactly once (scored or rejected, none of another input),
and a refused command changed nothing."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from curate.store import MANIFEST, REJECTS, read_manifest

BUDGET_S = float(os.environ.get("CURATE_PROPERTY_BUDGET_S", 150))
SEED = int(os.environ.get("CURATE_PROPERTY_SEED", 17))
CURATE = Path(sys.executable).parent / "curate"


def _rows(n: int, tag: str) -> list[dict]:
    rows = [{"id": f"{tag}{i:02d}", "messages": [{"role": "user", "content": f"Count to {i}."},
                                                 {"role": "assistant", "content": f"{tag} counts to {i}."}]}
            for i in range(n)]
    rows[3] = {"id": f"{tag}03", "messages": [{"role": "user", "content": "no answer"}]}  # one reject each
    return rows


def _snapshot(directory: Path) -> dict[str, str]:
    if not directory.exists():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != ".curate.lock"}


def _command(source: Path, out: Path, *flags: str) -> list[str]:
    return [str(CURATE), "score", str(source), "-o", str(out), "--shard-rows", "2", "--backend", "hf", "--quiet", *flags]


def _check_finished_run(out: Path, inputs: dict[str, list[str]]) -> None:
    """A complete manifest means: exactly the rows of the input it names, up to its limit, once each."""
    if not (out / MANIFEST).exists():
        return
    manifest = read_manifest(out)
    if not manifest.complete:
        return
    expected = inputs[manifest.meta["input"]["path"]][: manifest.meta["limit"]]
    files = [str(out / shard["file"]) for shard in manifest.shards]
    scored = pl.read_parquet(files).select("id", "row").rows() if files else []
    rejects = [json.loads(line) for line in (out / REJECTS).read_text().splitlines()]
    rows = sorted([row for _, row in scored] + [reject["row"] for reject in rejects])
    assert rows == list(range(len(expected))), f"rows not exactly once: {rows}"
    assert all(expected[row] == id_ for id_, row in scored), "a row of another input, or out of place"
    assert [reject["row"] for reject in rejects] == [3]


def test_random_faults_never_lose_or_mix_rows(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a_rows, b_rows = _rows(30, "A"), _rows(12, "B")
    a.write_text("".join(json.dumps(r) + "\n" for r in a_rows))
    b.write_text("".join(json.dumps(r) + "\n" for r in b_rows))
    inputs = {str(a.resolve()): [r["id"] for r in a_rows], str(b.resolve()): [r["id"] for r in b_rows]}
    out = tmp_path / "out"
    rng = random.Random(SEED)
    started, steps = time.monotonic(), []

    def run(*commands: list[str], kill_after: float | None = None) -> list[subprocess.CompletedProcess]:
        processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
        if kill_after is not None:
            time.sleep(kill_after)
            for process in processes:
                process.send_signal(signal.SIGKILL)
        return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in processes]

    while time.monotonic() - started < BUDGET_S:
        action = rng.choice(["start", "resume", "overwrite", "kill", "two-at-once"])
        source = rng.choice([a, b])
        limit = rng.choice([(), ("--limit", str(rng.randint(5, 12)))])
        steps.append((action, source.name, limit))
        before = _snapshot(out)
        if action == "kill":
            flags = rng.choice([("--overwrite",), ("--resume",), ()])
            run(_command(source, out, *flags, *limit), kill_after=rng.uniform(0.5, 8.0))
        elif action == "two-at-once":
            results = run(_command(a, out, "--overwrite"), _command(b, out, "--overwrite", "--limit", "6"))
            for result in results:
                assert result.returncode == 0 or "being written by another curate run" in result.stderr, (steps, result.stderr)
        else:
            flags = {"start": (), "resume": ("--resume",), "overwrite": ("--overwrite",)}[action]
            [result] = run(_command(source, out, *flags, *limit))
            assert "Traceback" not in result.stderr, (steps, result.stderr)
            if result.returncode != 0:
                assert _snapshot(out) == before, (steps, "a refused command changed the directory", result.stderr)
            elif action == "overwrite" or (action == "start" and not before):
                manifest = read_manifest(out)
                assert manifest.complete and manifest.meta["input"]["path"] == str(source.resolve()), steps
        _check_finished_run(out, inputs)

    [final] = run(_command(a, out, "--overwrite"))
    assert final.returncode == 0, (steps, final.stderr)
    _check_finished_run(out, inputs)
    assert len(steps) >= 3, f"the time budget allowed only {len(steps)} steps"
