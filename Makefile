# Set-up lives here: every target builds .venv first, so on a fresh machine
# `make train` and `make test` are the only two commands a user types.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install only when the dependency spec (or this file) changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
NPROC ?= 1
CONFIG ?= configs/tiny-cpu.toml
export ALFWORLD_DATA ?= $(CURDIR)/data/alfworld

ifeq ($(HAS_CUDA),1)
# CUDA machine: keep the user's torch/triton (visible through system site-packages).
VENV_FLAGS := --system-site-packages
TORCH_PIN :=
EXTRAS := dev,alfworld,pretrained
else
# CPU machine: torch 2.13.0 (local CPU wheel) and triton 3.7.1 (torch 2.13's pin) for the interpreter.
VENV_FLAGS :=
TORCH_PIN := torch==2.13.0 triton==3.7.1
EXTRAS := dev,alfworld,pretrained
TEST_ENV := TRITON_INTERPRET=1
endif

.PHONY: install train test test-all lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(TORCH_PIN),$(PY) -m pip install -q $(TORCH_PIN))
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

# --resume: a second `make train` continues (or, when finished, re-prints) the same run instead of
# refusing to overwrite it; a changed config is refused with the differing keys (use a new run.name).
train: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) trainer/main.py --config $(CONFIG) --resume

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q

test-all: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -m ''

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# GPU machine: the one-script check (compiled kernels + every benchmark, results in bench/results/).
# CPU: every benchmark at smoke sizes, so the scripts never rot (results in runs/bench/, ignored).
bench: $(STAMP)
ifeq ($(HAS_CUDA),1)
	PY=$(PY) bash bench/gpu_check.sh
else
	set -e; for b in bench/bench_*.py; do echo "== $$b"; $(TEST_ENV) $(PY) $$b --cpu-smoke --out-dir runs/bench; done
endif

clean:
	rm -rf $(VENV) build *.egg-info
