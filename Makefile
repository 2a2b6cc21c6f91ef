# Everything bootstraps from a fresh clone: every target depends on the venv that `setup` builds.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export PYTHONUNBUFFERED := 1

.PHONY: setup lint test train

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-compile -r requirements.txt 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch, hydra, wandb" 
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check harness tests infra bench

test: lint
	$(VENV)/bin/pytest -q tests

train: setup
	$(PY) -m harness.launch $(ARGS)
