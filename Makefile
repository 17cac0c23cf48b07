# Two entry points do all set-up on a fresh machine: `make train` and `make test`.
# Both create .venv, put the CPU build of torch 2.13.0 in it first (an unpinned torch
# would pull a multi-GB CUDA build), then install this project with its dev extra.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup train test bench gpu-check gpu-repro clean cluster-up cluster-down

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

train: setup
	$(BIN)/python jobs/train.py $(ARGS)

# A real `ray start` head (venv on its PATH, own temp dir and ports, token auth) and an
# `mlflow server` with artifact proxying, on this machine; then `source .cluster/env.sh`.
cluster-up: setup
	$(BIN)/python scripts/cluster.py up $(ARGS)

cluster-down:
	$(BIN)/python scripts/cluster.py down

# Ray test modules run one pytest process each (each with its one session-scoped local
# Ray): in a single process the driver's GCS state accessor was seen to block forever
# (`ray.cluster_resources()`) after earlier modules, in CI only. Our own queries no longer
# use that accessor (mtp/cluster/ray_env.py), but Ray's do: Tune's driver calls
# ray.cluster_resources() (tune/utils/resource_updater.py), Serve's controller ray.nodes().
# Its cause is not found, so one process per module stays the safe default.
RAY_TEST_MODULES := tests/test_cluster.py tests/test_evaluation.py tests/test_serve.py tests/test_tune.py tests/test_cluster_path.py

test: setup
	$(BIN)/python -m pytest $(addprefix --ignore=,$(RAY_TEST_MODULES)) $(ARGS)
	for module in $(RAY_TEST_MODULES); do $(BIN)/python -m pytest $$module $(ARGS) || exit 1; done

# The GPU check (docs/GPU.md). It installs nothing: the .venv's python where there is one,
# else the machine's python3 (on the GPU machine, the one that holds PyTorch).
# The CPU dry run: make gpu-check ARGS="--device cpu --tiny"
gpu-check:
	PYTHONPATH=platform $(if $(wildcard $(BIN)/python),$(BIN)/python,python3) jobs/gpu_check.py $(ARGS)

# The induction experiment at the paper's 1M size, n=1 vs n=2, several seeds at once on one GPU
# (docs/REPRODUCTION.md); the same installs-nothing rule. CPU dry run: make gpu-repro ARGS="--device cpu --tiny"
gpu-repro:
	PYTHONPATH=platform $(if $(wildcard $(BIN)/python),$(BIN)/python,python3) jobs/gpu_repro.py $(ARGS)

clean:
	rm -rf $(VENV) mlruns mlflow.db runs
