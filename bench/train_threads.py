"""What a fine-tuning step costs with one CPU thread against all cores: `accelerate launch` (which
`axolotl train` goes through) sets OMP_NUM_THREADS=1 when it is unset and `--cpu` is not given,
so on a machine without a GPU Axolotl trains on one core. `curate experiment` and `make finetune`
therefore set it to the usable cores themselves (`curate.recipes.training_env`).

    python bench/train_threads.py [--model DIR] [--batch 4] [--length 256] [--steps 3] [--repeats 2]

Each measurement runs in a fresh process with OMP_NUM_THREADS set (torch reads it when it loads),
timing `--steps` full-fine-tuning steps (forward, backward, AdamW) of the bundled model on random
token ids after one warm-up step; the settings alternate, and the fastest of `--repeats` counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STEP = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
batch, length, steps = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); optimizer.step(); optimizer.zero_grad()
step()
start = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"threads": torch.get_num_threads(), "seconds_per_step": (time.perf_counter() - start) / steps}))
"""


def measure(model: str, threads: int, batch: int, length: int, steps: int) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", STEP, model, str(batch), str(length), str(steps)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.path.expanduser("~/.cache/curate/models/SmolLM2-135M-Instruct"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    best: dict[int, float] = {}
    started = time.perf_counter()
    for _ in range(args.repeats):
        for threads in (1, cores):
            result = measure(args.model, threads, args.batch, args.length, args.steps)
            assert result["threads"] == threads, result
            best[threads] = min(best.get(threads, float("inf")), result["seconds_per_step"])
    print(f"batch {args.batch} x {args.length} tokens, {args.steps} steps, fastest of {args.repeats} "
          f"({time.perf_counter() - started:.0f} s in all)")
    for threads, seconds in best.items():
        print(f"OMP_NUM_THREADS={threads}: {seconds:.2f} s per step, {best[1] / seconds:.2f}x one thread")


if __name__ == "__main__":
    main()
