# Everything bootstraps from a fresh clone: every target depends on the venv that `setup` builds.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export PYTHONUNBUFFERED := 1

.PHONY: setup venvs lint test train checkpoints goodput cost-plan chaos bench-checkpoint bench-preemption bench-goodput bench-chaos-dense \
	bench-step bench-restart

setup: $(STAMP)

# pip byte-compiles what it installs on one core; compileall does the same on every core, in half the
# time. Nothing else writes this venv's .pyc files: the environment may set PYTHONDONTWRITEBYTECODE. A
# file that is not valid on this Python (torch ships a py312-only one) stays uncompiled, as pip leaves it.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install -q --no-compile --disable-pip-version-check -r requirements.txt 2>&1 \
		| { grep -v "is ignored: it is neither" || true; }
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	$(PY) -c "import torch, hydra, wandb, cdktf"
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check harness tests infra bench

# The two venvs are independent installs, each on one core: side by side.
venvs:
	$(MAKE) --no-print-directory -j 2 setup .venv-checkov

test: venvs lint
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --durations=15 --ignore=tests/chaos tests
	$(VENV)/bin/pytest -q tests/chaos  # the local Spot cloud's deadlines want the machine to itself

train: setup
	$(PY) -m harness.launch $(ARGS)

STORE ?= runs/default/checkpoints
checkpoints: setup
	$(PY) -m harness.checkpoint list $(STORE)

goodput: setup
	$(PY) -m harness.goodput $(or $(RUN),runs/default) $(ARGS)

cost-plan: setup
	$(PY) -m harness.plan $(ARGS)

chaos: setup
	$(PY) -m harness.chaos $(ARGS)

# Sweeps (harness/sweep/): `make sweep ARGS="optim.lr=1e-3,3e-4 model.n_layer=2,4 [sweep.parallel=2]
# [sweep.on=chaos]"` runs every job here and writes runs/<sweep>/sweep.json; the same ARGS again skip the
# finished jobs and resume the others. On GCP: `make deploy ARGS="--multirun infra.project=... <sweeps>"`,
# then `make sweep-status ARGS="sweep.on=gcp <the same overrides>"` reads the jobs' state from the bucket.
.PHONY: sweep sweep-status
sweep: setup
	$(PY) -m harness.sweep $(ARGS)

sweep-status: setup
	$(PY) -m harness.sweep --status $(ARGS)

bench-goodput: setup
	$(PY) -m bench.goodput $(ARGS)

bench-chaos-dense: setup
	$(PY) -m bench.chaos_dense $(ARGS)

bench-checkpoint: setup
	$(PY) -m bench.checkpoint --sizes 0.1 1 4 --sharded-gb 1 $(ARGS)

bench-preemption: setup
	TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone \
		--nproc-per-node=2 -m bench.preemption $(ARGS)

# Our loop (python -m harness.train, default config) against a bare DDP loop, 2 ranks: bench/results/step.json.
bench-step: setup
	$(PY) -m bench.step $(ARGS)

# Launcher start -> first step after a restore, split by phase, against the tree before issue 16: bench/results/restart.json.
bench-restart: setup
	$(PY) -m bench.restart $(ARGS)

# --- infra ---
# Terraform for Google Cloud from the same config tree: `make deploy ARGS="infra.project=my-proj
# topology=hybrid topology.workers.max=8"`. synth needs no cloud access and no terraform binary;
# plan/deploy/destroy need terraform (>= 1.5) or tofu, and `gcloud auth application-default login`.
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

.PHONY: synth plan deploy destroy logs cost-per-hour .venv-checkov

synth plan deploy destroy: setup
	$(PY) -m infra $@ $(ARGS)

# A run's log from Cloud Logging, every VM and incarnation, oldest first (infra/logs.py): `make logs
# ARGS="run.name=exp1 infra.project=my-proj [--freshness=6h] [--limit=200] [--role=worker] [--vm=NAME]"`.
logs: setup
	$(PY) -m infra logs $(ARGS)

cost-per-hour: setup
	$(PY) -m infra cost $(ARGS)

# checkov pins its own dependencies (it would downgrade `packaging` in .venv): its own venv, for `make test`.
.venv-checkov: $(CHECKOV_STAMP)

$(CHECKOV_STAMP):
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	set -o pipefail; $(CHECKOV_VENV)/bin/pip install -q --disable-pip-version-check checkov==3.3.30 2>&1 \
		| { grep -v "is ignored: it is neither" || true; }
	$(CHECKOV_VENV)/bin/checkov --version
	touch $(CHECKOV_STAMP)
