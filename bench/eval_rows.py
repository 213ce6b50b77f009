"""How many evaluation rows resolve a given change in accuracy: the half-width of the 95% paired
bootstrap interval (`curate.evaluate.forgetting`'s) of a fine-tuned-minus-base accuracy change,
for a number of rows per task, per task and for the mean over several tasks (the absolute
counterpart of BWT).

    python bench/eval_rows.py [--discordance 0.12,0.2,0.27] [--tasks 4] [--rows 100,250,500,1000]
    python bench/eval_rows.py --from-evals out/experiment/X/evals/base out/experiment/X/evals/ground-truth

A paired change's noise comes from the examples whose outcome flips between the two models (the
discordant share d): its half-width is about 1.96 * sqrt(d / n). Here it is measured, not assumed:
each setting draws base outcomes (accuracy 0.6) and flips a share d of them, half each way, then
bootstraps the mean change exactly as `forgetting` does (1,000 resamples of the examples, the same
for base and fine-tuned), and reports the median half-width over 20 such draws.

`--from-evals` reads the discordant share per task from two `curate eval` directories that scored
the same rows (say, a run of the previous experiment), instead of assuming it.

The discordance range 0.12-0.27 is what `make experiment`'s ARC-Easy run showed (README, 150 rows
per task: paired intervals of +-0.057 on PIQA to +-0.083 on SciQ, d = n * (half-width / 1.96)^2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

BOOTSTRAP_SAMPLES, DRAWS = 1000, 20


def half_width(discordance: float, rows: int, tasks: int = 1, accuracy: float = 0.6, seed: int = 0) -> float:
    """Median over DRAWS of the 95% paired bootstrap half-width of the mean change over `tasks` tasks."""
    rng = np.random.default_rng(seed)
    widths = []
    for _ in range(DRAWS):
        deltas = []
        for _ in range(tasks):
            base = (rng.random(rows) < accuracy).astype(float)
            tuned = base.copy()
            flip = rng.random(rows) < discordance
            tuned[flip] = 1 - tuned[flip]
            index = rng.integers(0, rows, size=(BOOTSTRAP_SAMPLES, rows))
            deltas.append(tuned[index].mean(axis=1) - base[index].mean(axis=1))
        mean_change = np.mean(deltas, axis=0)
        low, high = np.percentile(mean_change, [2.5, 97.5])
        widths.append((high - low) / 2)
    return float(np.median(widths))


def discordance_of(base_dir: Path, tuned_dir: Path) -> dict[str, float]:
    import pyarrow.parquet as pq

    out = {}
    for task in json.loads((Path(base_dir) / "results.json").read_text())["tasks"]:
        base = {r["id"]: r["correct"] for r in pq.read_table(Path(base_dir) / f"{task}.parquet", columns=["id", "correct"]).to_pylist()}
        tuned = {r["id"]: r["correct"] for r in pq.read_table(Path(tuned_dir) / f"{task}.parquet", columns=["id", "correct"]).to_pylist()}
        shared = [k for k in base if k in tuned and base[k] is not None and tuned[k] is not None]
        out[task] = sum(base[k] != tuned[k] for k in shared) / len(shared)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--discordance", default="0.12,0.2,0.27")
    parser.add_argument("--tasks", type=int, default=4, help="OOD tasks averaged (BWT's)")
    parser.add_argument("--rows", default="100,150,250,400,600,1000")
    parser.add_argument("--from-evals", nargs=2, type=Path, metavar=("BASE", "TUNED"))
    args = parser.parse_args()
    if args.from_evals:
        found = discordance_of(*args.from_evals)
        print("discordant share per task:", ", ".join(f"{t} {d:.3f}" for t, d in found.items()))
        levels = sorted(set(round(d, 3) for d in found.values()))
    else:
        levels = [float(d) for d in args.discordance.split(",")]
    rows = [int(n) for n in args.rows.split(",")]
    print(f"95% paired bootstrap half-width of an accuracy change (median of {DRAWS} draws)")
    print(f"{'d':>6} {'rows':>6} {'one task':>9} {f'mean of {args.tasks}':>11}")
    for d in levels:
        for n in rows:
            print(f"{d:>6.3f} {n:>6} {half_width(d, n):>9.3f} {half_width(d, n, args.tasks):>11.3f}")


if __name__ == "__main__":
    main()
