"""Validate recipes against Axolotl's own config schema, as on an 80 GB Hopper GPU, without one.

Run with the Axolotl environment's Python: `.venv-axolotl/bin/python recipes/axolotl/validate.py CONFIG...`
(configs already filled in by `curate check-recipe`). Exits non-zero on the first invalid one.
"""

import sys

import torch
import yaml
from axolotl.utils.config import validate_config
from axolotl.utils.dict import DictDefault

H100 = {"bf16": True, "fp8": True, "tf32": True, "n_gpu": 1, "compute_capability": "sm_90"}

for path in sys.argv[1:]:
    with open(path) as handle:
        config = DictDefault(yaml.safe_load(handle))
    validated = validate_config(
        config, capabilities=H100, env_capabilities={"torch_version": torch.__version__.split("+")[0]}
    )
    print(f"ok {path}: {validated['base_model']}, adapter={validated.get('adapter')}, lr={validated['learning_rate']}")
