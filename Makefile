# One entry point for newcomers and CI. `make up` mines new photos into ./gallery from every
# source that needs no account (reddit's Atom feeds, flickr's feed, Bluesky; Commons with NOMAD_CONTACT);
# `make test` runs the test suite (`make test-fast`: without the end-to-end tests); `make demo` runs the whole system offline.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Built model artifacts: a data folder, not the models/ code package (an old models/ is still read, with a notice).
MODELS ?= var/models
# CI pins torch to the builds on its disk (.ci/constraints.txt); users are not pinned.
PIP_CONSTRAINT ?=
export PIP_CONSTRAINT
# Where `make setup` looks for torch as well as PyPI: PyTorch's CPU-only wheels (no CUDA libraries: a few GB
# smaller). Empty = PyPI only (CI sets it empty: its machines reach PyPI, not download.pytorch.org).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX_ARGS := $(if $(strip $(TORCH_INDEX)),--extra-index-url $(TORCH_INDEX))

.PHONY: setup setup-runtime test test-fast browser up demo bench clean

$(VENV)/.installed-all: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX_ARGS) -e '.[models,test]'
	touch $@

$(VENV)/.installed-runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

## setup: the full environment (services, model building with CPU-only torch from TORCH_INDEX, tests)
setup: $(VENV)/.installed-all

## setup-runtime: only what the three services and the demo need (no torch; about 0.55 GB)
setup-runtime: $(VENV)/.installed-runtime

## browser: find or install Debian's chromium for the browser tests (apt-get as root, else says how)
browser:
	@tools/ensure-chromium.sh

## test: the whole test suite (what .ci/run calls)
test: setup browser
	$(PY) -m pytest -q -p no:cacheprovider

## test-fast: the inner loop: every test except the end-to-end ones (marker e2e: whole system, browser, compose, installed package)
test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not e2e"

## up: the main job: build missing models, start anti_sus, gallery_bridge and nomad (Ctrl-C stops all)
up: setup
	$(PY) -m stack.up --models $(MODELS)

## demo: the whole system offline in about a minute (tiny ONNX models, emulated sites, no credentials; no torch)
demo: setup-runtime
	$(PY) -m stack.demo

## bench: every benchmark in one run, one markdown table with the CPU and issue 14's goals (bench/report.py)
bench: setup
	$(PY) bench/report.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
