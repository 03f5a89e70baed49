# atoll — every target creates .venv on first use (torch first, pinned, then the project).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: help demo test test-unit test-integration ui bench lint clean

help:
	@echo "make demo   - set up, train the demo (MLP on digits), federations of 10, 5 and 200 clients"
	@echo "make test   - set up and run the whole test suite"
	@echo "make ui     - MLflow UI on http://127.0.0.1:5000"
	@echo "make bench  - benchmarks (prints figures and a ratio)"
	@echo "make lint   - ruff"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	# torch first and pinned: the local CPU wheel, never the CUDA build from the index
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/atoll demo

# two xdist workers, each taking whole modules (one Ray head or federation set-up per
# module), the longest first (tests/conftest.py)
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder tests/integration

ui: $(STAMP)
	$(BIN)/atoll ui

bench: $(STAMP)
	$(BIN)/python benchmarks/tracking_overhead.py
	$(BIN)/python benchmarks/fl_overhead.py
	$(BIN)/python benchmarks/fl_vectorized.py
	$(BIN)/python benchmarks/compression.py
	$(BIN)/python benchmarks/ddp_overhead.py
	$(BIN)/python benchmarks/pipeline_scaling.py
	$(BIN)/python benchmarks/streaming.py
	$(BIN)/python benchmarks/checkpoint_save.py
	$(BIN)/python benchmarks/gpu_throughput.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf .atoll mlruns.db mlartifacts .pytest_cache
