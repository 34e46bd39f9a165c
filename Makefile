# Two entry points, each setting up its own virtual environment first:
#   make demo   train on 2 Gloo ranks with SyncBatchNorm (launch/torchrun.sh 2)
#   make test   lint and the full test suite, multi-process tests included
#   make gpu-check  the one-shot GPU check (benchmarks/gpu_check.py), for a machine with CUDA
# TORCH picks the torch build: the default pin is a CPU build on machines whose pip is
# configured for it; elsewhere use e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cpu".
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(abspath $(VENV))/bin

.PHONY: kernels demo test bench gpu-check

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test,mpi,demo,bench]"
	touch $@

# The CPU kernels build (once, about a minute) in a step of their own, before any progress bar.
kernels: $(VENV)/.installed
	$(BIN)/python -c "import syncbn.kernels as k; print('syncbn: CPU kernels', 'ready' if k.available() else 'unavailable')"

demo: kernels
	PATH="$(BIN):$$PATH" bash launch/torchrun.sh 2

test: kernels
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PATH="$(BIN):$$PATH" $(BIN)/python -m pytest -n auto

bench: $(VENV)/.installed
	for script in layer compile join scaling comm_model convergence; do \
		PATH="$(BIN):$$PATH" $(BIN)/python benchmarks/$$script.py || exit 1; \
	done

gpu-check: $(VENV)/.installed
	$(BIN)/python benchmarks/gpu_check.py
