# Two commands do all the set-up on a fresh machine:
#   make run    install the pinned environment, then run the whole pipeline on the full dataset
#   make test   install the pinned environment, then run the test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Offline and quiet: no telemetry or update checks from Prefect or DVC.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export PATH := $(CURDIR)/$(BIN):$(PATH)
# Python writes a module's bytecode the first time it imports it, as it does by default: with a
# shell's PYTHONDONTWRITEBYTECODE, every process would compile its imports again.
unexport PYTHONDONTWRITEBYTECODE
# What the stages, flows, tools and tests import (a third of the venv's modules), compiled at set-up
# in two processes side by side rather than by three test workers at once; the rest compiles when
# first imported. uv's --compile-bytecode compiles every module: 36 CPU-seconds where this takes 26,
# in 15 s instead of 19 on 2 cores. (TensorFlow's harmless start-up lines filtered as stages do.)
WARM_TENSORFLOW := keras,tasks.lib.model,matplotlib.pyplot,scipy.stats
WARM_TOOLS := flows.pipeline,flows.sweep,flows.serve,flows.schedule,prefect.cli,prefect.server.api.server,\
	dvc.cli,dvc.repo,dvc.commands.experiments,gto.cli,pytest,xdist

.PHONY: setup run repro test lint lock peer-setup

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==0.13.9

$(VENV)/.synced: requirements.lock | $(BIN)/uv
	$(BIN)/uv pip sync --quiet --python $(BIN)/python requirements.lock
	$(BIN)/python -c 'import tasks.lib.cli as c; c.filter_native_stderr(); import $(WARM_TENSORFLOW)' & \
		tensorflow=$$!; $(BIN)/python -c 'import $(WARM_TOOLS)' && wait $$tensorflow
	touch $@

setup: $(VENV)/.synced

run: setup
	$(BIN)/python -m flows.pipeline

repro: setup
	$(BIN)/dvc repro --pull

# Three worker processes (pytest-xdist) on 2 cores: with two, the cores sat idle a fifth of the
# time while tests waited on servers, heartbeats and held-still runs. The 25 slowest tests close
# every run, so CI's cost stays in view.
test: setup
	$(BIN)/python -m pytest -n 3 --dist worksteal --durations=25

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

lock: $(BIN)/uv
	$(BIN)/uv pip compile --quiet --python-version 3.11 --generate-hashes --extra dev pyproject.toml -o requirements.lock

# The peer of bench.side_by_side (airbench on torch, pyproject's `peer` extra) in a venv of its own:
# torch's native libraries never meet TensorFlow's. Where pip finds torch's CPU build (2.13.0+cpu)
# it takes that; elsewhere PyPI's, which brings CUDA's libraries too.
peer-setup:
	$(PYTHON) -m venv .venv-peer
	.venv-peer/bin/pip install --quiet --disable-pip-version-check $$($(PYTHON) -c 'import tomllib; \
		print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["peer"]))')
