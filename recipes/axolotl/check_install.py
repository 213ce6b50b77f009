"""Print what the Axolotl environment holds; with --gpu, check that the GPU recipes can run on it.

Run by `make axolotl` with the Axolotl environment's Python (`--gpu` where `nvidia-smi`
exists). On a GPU machine the recipes need torch to see the GPU, the GPU to do bf16 (they
train in it) and bitsandbytes' 8-bit AdamW (their optimizer) to take a step on it: each is
checked, and the first that fails exits non-zero with what to do.
"""

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("axolotl", "torch", "transformers", "peft", "bitsandbytes", "flash-attn")
# PyPI's torch is built for one CUDA version; pytorch.org lists builds for others (Axolotl 0.19.0 takes torch 2.11-2.13).
TORCH_INDEX_HINT = (
    "rm -rf .venv-axolotl && make axolotl TORCH_INDEX=https://download.pytorch.org/whl/cu128 "
    "(or the cuXYZ build of torch 2.13 that your driver's CUDA version runs)"
)


def installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def fail(message: str) -> None:
    print(f"check_install: {message}", file=sys.stderr)
    sys.exit(1)


def check_gpu(torch) -> None:
    if not torch.cuda.is_available():
        build = (
            f"its CUDA {torch.version.cuda} build may need a newer driver than this machine's (nvidia-smi says "
            "which CUDA version the driver runs)"
            if torch.version.cuda
            else "it is a CPU-only build"
        )
        fail(
            f"nvidia-smi is here but torch {torch.__version__} sees no GPU: {build}. Install a build the driver runs: "
            f"{TORCH_INDEX_HINT}"
        )
    if not torch.cuda.is_bf16_supported():
        fail(
            f"{torch.cuda.get_device_name(0)} has no bf16; the GPU recipes train in bf16 (Ampere or newer, e.g. A100, H100)"
        )
    import bitsandbytes

    # 8192 elements: bitsandbytes keeps 8-bit state only for tensors of at least 4096.
    weight = torch.nn.Parameter(torch.ones(8192, device="cuda"))
    optimizer = bitsandbytes.optim.AdamW8bit([weight], lr=1e-3)
    weight.sum().backward()
    optimizer.step()
    torch.cuda.synchronize()
    if optimizer.state[weight]["state1"].dtype != torch.uint8 or not bool((weight < 1).all()):
        fail("bitsandbytes' 8-bit AdamW did not take an 8-bit step on the GPU (the recipes' adamw_bnb_8bit)")
    print(f"bitsandbytes 8-bit AdamW steps on {torch.cuda.get_device_name(0)}")
    if installed("flash-attn") != "not installed":
        import flash_attn  # noqa: F401  (a build for another torch fails here, not mid-training)

        print("flash_attn imports: `attn_implementation: flash_attention_2` is available")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gpu", action="store_true", help="this machine has an NVIDIA GPU: check the recipes can use it"
    )
    gpu = parser.parse_args().gpu
    import torch

    print(", ".join(f"{package} {installed(package)}" for package in PACKAGES))
    cuda = torch.cuda.is_available()
    device = f" ({torch.cuda.get_device_name(0)})" if cuda else ""
    print(f"torch CUDA build: {torch.version.cuda or 'none'}; CUDA available: {cuda}{device}")
    if gpu:
        check_gpu(torch)


if __name__ == "__main__":
    main()
