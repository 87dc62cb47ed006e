# dist-contrast: `make train` and `make test` set up whatever is missing, then run.
#
# Set-up: a virtual environment in .venv with torch $(TORCH_VERSION) installed first (the CPU
# wheel here; pip leaves an installed torch alone), then this package and its dependencies.
# Bring your own environment instead (a cluster's CUDA torch): make train PYTHON=/path/to/python
# -- then only this package is installed into it, in editable mode, if it is not importable.

VENV          ?= .venv
TORCH_VERSION ?= 2.13.0
NPROC         ?= 2
CONFIG        ?= configs/clip_digits.yaml
DIGITS        ?= data/digits
STAMP_RUN     := $(shell date +%Y%m%d-%H%M%S)
RUN           ?= $(basename $(notdir $(CONFIG)))-$(STAMP_RUN)
PYTEST_ARGS   ?=
QUALITY_ARGS  ?=

ifeq ($(origin PYTHON),undefined)
PYTHON := $(VENV)/bin/python
SETUP  := $(VENV)/.setup-done
else
SETUP  := external-env
endif

.PHONY: setup train test test-slow test-open-clip test-all quality lint data clean-runs external-env open-clip-env

setup: $(SETUP)

$(VENV)/.setup-done: pyproject.toml
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	@$(VENV)/bin/python -c "import torch" 2>/dev/null || \
	  $(VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	@touch $@

external-env:
	@$(PYTHON) -c "import dist_contrast" 2>/dev/null || $(PYTHON) -m pip install -q -e '.[test]'

# --force: this rule runs only while counts.json (written last) is missing, so what it replaces
# is the rest of an interrupted write
$(DIGITS)/counts.json: | $(SETUP)
	$(PYTHON) -m dist_contrast.cli shards digits --out $(DIGITS) --force

# BPE over the digits captions for CLIP (configs/clip_digits.yaml reads it)
$(DIGITS)/tokenizer.json: $(DIGITS)/counts.json
	$(PYTHON) -m dist_contrast.cli tokenizer train --shards '$(DIGITS)/train-*.tar' \
	  --vocab-size 512 --out $@

data: $(DIGITS)/counts.json $(DIGITS)/tokenizer.json

# The default job: CLIP on the digits on 2 local ranks (DeepSpeed ZeRO-2, gloo on CPU), then
# evaluation (zero-shot, retrieval, kNN, linear probe) and export to runs/$(RUN)/export.
# CPU kernels pinned to AVX2 (torch's own, oneDNN's, MKL's): an AVX-512 machine otherwise sums
# in another order and ends a few tenths of a point away from the README's figures (measured:
# 95.8% zero-shot native, 96.7% pinned, as on an AVX2 machine; with the BPE tokenizer that
# puts end-of-text at id 1, 96.1% and 96.4%). REPRO_ENV= for the native ones.
REPRO_ENV     ?= ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
train: $(SETUP) $(DIGITS)/counts.json $(DIGITS)/tokenizer.json
	$(REPRO_ENV) PYTHON=$(PYTHON) launch/local.sh $(NPROC) $(CONFIG) run.name=$(RUN)
	$(REPRO_ENV) $(PYTHON) -m dist_contrast.cli eval --run runs/$(RUN) --brief
	$(REPRO_ENV) $(PYTHON) -m dist_contrast.cli export --run runs/$(RUN) --out runs/$(RUN)/export
	@echo "run directory: runs/$(RUN) (metrics.jsonl, plots/, eval.json, export/)"

# `make test`: ruff and every test but those marked slow (end-to-end launches: every config
# trained, Slurm, preemption, torch.compile, the planner's measurements...), under 15 minutes on
# 2 cores. `make test-slow` runs the slow ones, `make test-all` both; CI (.ci/run) runs both.
TEST_MARKERS  ?= not slow
test: $(SETUP)
	$(PYTHON) -m ruff check dist_contrast tests bench
	$(PYTHON) -m pytest -m "$(TEST_MARKERS)" $(PYTEST_ARGS)

test-slow: $(SETUP)
	$(PYTHON) -m pytest -m slow $(PYTEST_ARGS)

# The tests that need open_clip (marked open_clip: exports loaded there, open_clip's models read
# here), in open_clip's own environment, built first; `make test` runs them too where it exists
test-open-clip: $(SETUP) open-clip-env
	$(PYTHON) -m pytest -m open_clip $(PYTEST_ARGS)

test-all: $(SETUP)
	$(PYTHON) -m ruff check dist_contrast tests bench
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# Every configs/*_digits.yaml trained on 2 local ranks, then kNN and linear probe of the trained
# and of the initial encoder: the method table of docs/benchmarks.md (bench/results/quality.json).
quality: $(SETUP) $(DIGITS)/counts.json $(DIGITS)/tokenizer.json
	$(PYTHON) -m dist_contrast.cli bench quality $(QUALITY_ARGS)

# open_clip_train (open-clip-torch 3.3.0) in an environment of its own, for `dist-contrast bench
# vs_open_clip` and the open_clip tests; the project's environment is untouched.
OPEN_CLIP_VENV ?= .venv-open-clip
open-clip-env: $(OPEN_CLIP_VENV)/.setup-done

$(OPEN_CLIP_VENV)/.setup-done: bench/open_clip_env.sh bench/open_clip_fix.py
	TORCH_VERSION=$(TORCH_VERSION) bench/open_clip_env.sh $(OPEN_CLIP_VENV)

lint: $(SETUP)
	$(PYTHON) -m ruff check dist_contrast tests bench
	$(PYTHON) -m ruff format --check dist_contrast tests bench

clean-runs:
	rm -rf runs
