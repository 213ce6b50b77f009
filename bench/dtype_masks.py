"""How much the scoring dtype moves STM's masks: a scored set's rows scored again with the HF
engine in float32 and in bfloat16 (and float16), on this machine's device, in one run.

    python bench/dtype_masks.py SCORED_DIR [--model DIR] [--rows N]

`--dtype auto` scores in bfloat16 on a GPU, and STM masks a token when its NLL is above ln τ, so
a token near the cut can land on the other side than in float32. Against float32 on the same
device, for each dtype: the mean and largest |Δ logprob| over target tokens, the share of target
tokens that change side of τ for several τ, and for a 20% mask ratio (`--mask-ratio 0.2`) the
share of the masked set that differs. The scored set's own log-probabilities (whatever engine
wrote it) are compared to float32 in the same way, as one more row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate import masking  # noqa: E402
from curate.engines.base import EngineSettings  # noqa: E402
from curate.engines.hf import HFEngine  # noqa: E402
from curate.store import open_scored  # noqa: E402

TAUS = (1.5, 2.5, 10.0)
RATIO = 0.2


def read_rows(scored: Path, limit: int) -> list[dict]:
    """id, input_ids, target and the stored logprobs of the first `limit` rows, read from the shards."""
    rows = []
    for shard in open_scored(scored)[1]:
        rows += pq.read_table(shard, columns=["id", "input_ids", "target", "logprobs"]).to_pylist()
    return rows[:limit]


def target_logprobs(rows: list[dict], logprobs: list) -> np.ndarray:
    """The target tokens' logprobs, every row's in order, as one array."""
    return np.concatenate([np.asarray(lp, dtype=np.float64)[np.asarray(row["target"], dtype=bool)]
                           for row, lp in zip(rows, logprobs)])


def threshold_mask(logprobs: np.ndarray, tau: float) -> np.ndarray:
    """What `curate export --mode stm --threshold tau` masks."""
    return ~masking.threshold_keep(logprobs, np.ones(logprobs.size, dtype=bool), tau)


def ratio_mask(logprobs: np.ndarray, ratio: float) -> np.ndarray:
    """What `curate export --mode stm --mask-ratio ratio` masks of the set (nothing protected)."""
    everything = np.ones(logprobs.size, dtype=bool)
    keep, _ = masking.cutoff_keep(logprobs, everything, ~everything, *masking.ratio_cutoff(-logprobs, ratio))
    return ~keep


def compare(reference: np.ndarray, other: np.ndarray) -> str:
    diff = np.abs(other - reference)
    flips = [np.mean(threshold_mask(reference, tau) != threshold_mask(other, tau)) for tau in TAUS]
    a, b = ratio_mask(reference, RATIO), ratio_mask(other, RATIO)
    return (f"{diff.mean():>10.2e} {diff.max():>9.2e} " + " ".join(f"{f:>9.3%}" for f in flips)
            + f" {np.sum(a != b) / 2 / a.sum():>11.3%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scored", type=Path, help="a scored directory (its rows and stored logprobs)")
    parser.add_argument("--model", default=None, help="the model [default: the bundled one]")
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--dtypes", default="bfloat16,float16")
    args = parser.parse_args()
    from curate.models import resolve_model

    model = resolve_model(args.model)
    rows = read_rows(args.scored, args.rows)
    tokens = [row["input_ids"] for row in rows]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{len(rows)} rows, {sum(map(len, tokens)):,} tokens, {sum(sum(r['target']) for r in rows):,} target; "
          f"device {name}; torch {torch.__version__}")
    scored = {}
    for dtype in ["float32", *args.dtypes.split(",")]:
        engine = HFEngine(model, EngineSettings(dtype=dtype))
        start = time.perf_counter()
        scored[dtype] = target_logprobs(rows, engine.score(tokens))
        print(f"scored in {dtype}: {time.perf_counter() - start:.1f} s", flush=True)
        engine.close()
    reference = scored.pop("float32")
    scored["stored (the engine that wrote the set)"] = target_logprobs(rows, [row["logprobs"] for row in rows])
    print(f"\nagainst float32 on {name}:")
    print(f"{'':<40} {'mean |Δ|':>10} {'max |Δ|':>9} " + " ".join(f"{f'flip τ={t:g}':>9}" for t in TAUS)
          + f" {'Δ mask 20%':>11}")
    for label, logprobs in scored.items():
        print(f"{label:<40} {compare(reference, logprobs)}")
    print("\ntarget tokens masked in float32: " + ", ".join(
        f"τ={tau:g} {np.mean(threshold_mask(reference, tau)):.1%}" for tau in TAUS))


if __name__ == "__main__":
    main()
