# Set-up lives here: every target builds .venv first, so on a fresh machine
# `make train` and `make test` are the only two commands a user types.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every install takes its versions from constraints.txt: the versions the suite last passed with (the
# package registry moves; a new upstream release must not turn a green main red overnight). torch and
# triton are pinned below, not there. `make test-latest` tries the newest allowed versions on purpose in
# .venv-latest; `make lock` then records them (README: "Refreshing the pins").
CONSTRAINTS := constraints.txt
# Re-install only when the dependency spec, the pins (or this file) change.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) Makefile | sha1sum | cut -c1-12)
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

.PHONY: install train test test-all test-latest lock lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(TORCH_PIN),$(PY) -m pip install -q $(TORCH_PIN))
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

# The newest versions pyproject.toml allows, on purpose, in a separate venv (torch/triton as above).
LATEST := .venv-latest
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(VENV_FLAGS) $(LATEST)
	$(if $(TORCH_PIN),$(LATEST)/bin/python -m pip install -q $(TORCH_PIN))
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]'
	$(TEST_ENV) $(LATEST)/bin/python -m pytest -q

# Record what `make test-latest` just passed with as the new pins (torch/triton stay in this Makefile).
lock:
	test -x $(LATEST)/bin/python || { echo "run make test-latest first"; exit 1; }
	{ echo "# Versions the test suite last passed with (make test-latest, then make lock). Python $$($(LATEST)/bin/python -c 'import platform; print(platform.python_version())'), $$(date -u +%F)."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)=='; } > $(CONSTRAINTS)

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
	PY=$(PY) bash bench/device_run.sh runs/device_run
else
	set -e; for b in bench/bench_*.py; do echo "== $$b"; $(TEST_ENV) $(PY) $$b --cpu-smoke --out-dir runs/bench; done
endif

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
